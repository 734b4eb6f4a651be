"""What a terminal front end needs, none of it about guildtune: Discord markdown as terminal
styles (``render_markdown``), library output kept out of the chat (``library_output_to``), a
stdin line that Ctrl-C does not wait for (``read_line``), and ``is_terminal``. Used by the
console (bot/console.py). A UI module: it writes to the streams it is given on purpose.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, TextIO

STDERR_FD = 2  # the process's stderr, whatever sys.stderr is now


# Discord markdown the terminal can show as a style (SGR codes): bold, underline, struck out,
# a spoiler reversed; code spans and blocks in cyan.
_STYLES = {"**": "1", "__": "4", "~~": "9", "||": "7"}
_CODE = "`"
_SGR = {**_STYLES, _CODE: "36"}


def render_markdown(text: str, *, final: bool = True) -> str:
    """Discord markdown in terminal styles: ``**bold**``, ``__underline__``, ``~~struck~~``,
    ``||spoiler||`` (reversed), `` `code` `` and fenced blocks (cyan; nothing inside is
    markdown), backslash escapes. The markers are not shown. Single ``*``/``_`` (italics) are
    left as typed: in chat they are as often a product or a snake_case name.

    Read left to right, deciding each marker from at most the character after it; a streamed
    ``text`` (``final=False``) is rendered up to the first marker it may end inside. So the
    rendering of a reply's prefix is a prefix of the rendering of the reply, and a streamed
    reply can be printed as it grows. ``final`` also ends every open style."""
    out: list[str] = []
    on: list[str] = []  # the open markers, oldest first
    fence = ""  # the backticks of the open code span or block
    i, n = 0, len(text)

    def restyle() -> None:
        out.append("\x1b[0m" + "".join(f"\x1b[{_SGR[m]}m" for m in on))

    while i < n:
        c = text[i]
        if c == "`":
            j = i
            while j < n and text[j] == "`":
                j += 1
            if j == n and not final:
                break  # the run of backticks may go on
            if not fence or text[i:j] == fence:
                fence = "" if fence else text[i:j]
                if fence:
                    on.append(_CODE)
                else:
                    on.remove(_CODE)
                restyle()
            else:
                out.append(text[i:j])
            i = j
            continue
        if fence:
            out.append(c)
            i += 1
            continue
        pair = text[i:i + 2]
        if c in "\\*_~|" and i + 1 == n and not final:
            break  # an escape or a marker may be on its way
        if c == "\\" and pair[1:] and pair[1] in "\\*_~|`":
            out.append(pair[1])
            i += 2
            continue
        if pair in _STYLES:
            if pair in on:
                on.remove(pair)
                restyle()
            elif i + 2 == n and not final:
                break  # an opening marker needs its next character to be seen
            elif i + 2 < n and not text[i + 2].isspace():
                on.append(pair)
                restyle()
            else:
                out.append(pair)  # "a ** b": not markup
            i += 2
            continue
        out.append(c)
        i += 1
    if final and on:
        out.append("\x1b[0m")
    return "".join(out)


@contextmanager
def library_output_to(path: Path) -> Iterator[None]:
    """While the console runs, what libraries write for the operator goes to ``path`` (appended),
    not into the chat: log records (INFO and up), warnings, and whatever reaches the stderr file
    descriptor (progress bars, native code, a library's own log handler). Restored on the way
    out, so an error printed after the session reaches the terminal."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sys.stderr.flush()
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        try:
            saved: int | None = os.dup(STDERR_FD)
        except OSError:  # no stderr at all
            saved = None
        handler = logging.StreamHandler(f)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.handlers[:] = [handler]
        root.setLevel(min(level, logging.INFO))
        logging.captureWarnings(True)
        if saved is not None:
            os.dup2(f.fileno(), STDERR_FD)
        try:
            with redirect_stderr(f):  # Python's own writes, wherever sys.stderr pointed
                yield
        finally:
            sys.stderr.flush()
            if saved is not None:
                os.dup2(saved, STDERR_FD)
                os.close(saved)
            logging.captureWarnings(False)
            root.handlers[:] = handlers
            root.setLevel(level)


def read_line(stdin: TextIO) -> Awaitable[str]:
    """``stdin.readline()`` in a daemon thread of its own. Unlike ``asyncio.to_thread``, whose
    executor ``asyncio.run`` waits for on its way out, a read still waiting for Enter does not
    hold up the exit at Ctrl-C. One line per call: stdin is read no further than the console
    has got (a script may do something between two lines)."""
    got: concurrent.futures.Future[str] = concurrent.futures.Future()

    def read() -> None:
        if not got.set_running_or_notify_cancel():
            return
        try:
            got.set_result(stdin.readline())
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, as to_thread does
            got.set_exception(exc)

    threading.Thread(target=read, name="guildtune-console-stdin", daemon=True).start()
    return asyncio.wrap_future(got)


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed
        return False
