"""What the event loop and a local engine's model thread hand each other: queued requests
(``GenItem``) and controls (``CtlItem``), the stop marker, and the way back (``resolve`` for a
future, ``call_on_text`` for a streamed text), both run on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bot.engine.base import GenerationRequest, GenerationResult, OnText

log = logging.getLogger(__name__)


@dataclass
class GenItem:
    req: GenerationRequest
    fut: asyncio.Future[GenerationResult]
    loop: asyncio.AbstractEventLoop
    t0: float
    on_text: OnText | None = None


@dataclass
class CtlItem:
    fn: Callable[[], Any]
    fut: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    # What it changes, for the step loop: ("activate" | "deactivate", guild); None: unknown
    # (waits for every running row).
    target: tuple[str, int] | None = None


STOP = object()


def resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any = None,
             exc: BaseException | None = None) -> None:
    """Complete an asyncio future from the model thread (the loop may already be gone)."""
    def _set() -> None:
        if fut.done():  # cancelled by the caller meanwhile
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    try:
        loop.call_soon_threadsafe(_set)
    except RuntimeError:  # loop closed: nobody is waiting any more
        pass


def call_on_text(fn: OnText, text: str) -> None:
    """Run a streaming callback on the event loop; its exceptions are logged, never raised."""
    try:
        fn(text)
    except Exception:
        log.exception("on_text callback failed (ignored)")
