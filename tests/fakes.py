"""Small fakes for the bot tests: an engine that returns queued replies, fake interactions."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from bot.engine import AdapterError, Engine, GenerationRequest, GenerationResult
from bot.services import Services
from guildtune.config import Config, parse_config
from storage.store import open_store


class FakeEngine(Engine):
    """Returns queued replies (else ``default``); records requests; fails listed versions."""

    def __init__(self, default: str = "hello there") -> None:
        self.default = default
        self.replies: deque[str] = deque()
        self.requests: list[GenerationRequest] = []
        self.versions: dict[int, int] = {}
        self.broken: set[int] = set()
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        self.requests.append(req)
        text = self.replies.popleft() if self.replies else self.default
        v = self.versions.get(req.guild_id) if req.guild_id is not None else None
        return GenerationResult(text, v, 10, len(text.split()), 5.0)

    async def activate(self, guild_id: int, version: int, path: Any) -> None:
        if version in self.broken:
            raise AdapterError(f"adapter v{version} is corrupt")
        self.versions[guild_id] = version

    async def deactivate(self, guild_id: int) -> None:
        self.versions.pop(guild_id, None)

    def active_versions(self) -> dict[int, int]:
        return dict(self.versions)


class FakeScheduler:
    """Stands in for APScheduler's AsyncIOScheduler: start/shutdown symmetry only."""

    def __init__(self) -> None:
        self.running = False
        self.shutdowns = 0

    def start(self) -> None:
        self.running = True

    def shutdown(self, wait: bool = True) -> None:
        self.running = False
        self.shutdowns += 1


def make_config(tmp_path: Path, **sections: Any) -> Config:
    data: dict[str, Any] = {"storage": {"data_dir": str(tmp_path)}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return parse_config(data, env={})


def make_services(tmp_path: Path, *, engine: FakeEngine | None = None, **sections: Any) -> Services:
    cfg = make_config(tmp_path, **sections)
    return Services(config=cfg, store=open_store(tmp_path / "x.db"),
                    engine=engine or FakeEngine(), watch_interval=0.05)


class Perms:
    def __init__(self, manage_guild: bool) -> None:
        self.manage_guild = manage_guild


class FakeUser:
    def __init__(self, id: int, admin: bool = False, name: str = "member") -> None:
        self.id = id
        self.guild_permissions = Perms(admin)
        self.display_name = self.name = name
        self.bot = False


class FakeGuild:
    def __init__(self, id: int, name: str = "Test Guild") -> None:
        self.id = id
        self.name = name


class FakeMessage:
    def __init__(self, id: int) -> None:
        self.id = id


class FakeResponse:
    def __init__(self, inter: FakeInteraction) -> None:
        self.inter = inter
        self._done = False

    def is_done(self) -> bool:
        return self._done

    async def send_message(self, content: str | None = None, **kw: Any) -> None:
        assert not self._done, "responded twice"
        self._done = True
        self.inter.sent.append({"content": content, **kw})

    async def defer(self, **kw: Any) -> None:
        self._done = True

    async def send_modal(self, modal: Any) -> None:
        self._done = True
        self.inter.modals.append(modal)


class FakeFollowup:
    def __init__(self, inter: FakeInteraction) -> None:
        self.inter = inter

    async def send(self, content: str | None = None, **kw: Any) -> None:
        self.inter.sent.append({"content": content, **kw})


class FakeInteraction:
    """What the command callbacks read of a ``discord.Interaction``; records every answer."""

    def __init__(self, client: Any, guild_id: int | None, user: FakeUser,
                 message_id: int | None = None) -> None:
        self.client = client
        self.guild_id = guild_id
        self.guild = FakeGuild(guild_id) if guild_id is not None else None
        self.user = user
        self.channel_id = 1
        self.message = FakeMessage(message_id) if message_id is not None else None
        self.command = None
        self.sent: list[dict[str, Any]] = []
        self.modals: list[Any] = []
        self.response = FakeResponse(self)
        self.followup = FakeFollowup(self)

    @property
    def text(self) -> str:
        """All text answered so far."""
        return "\n".join(str(s.get("content") or "") for s in self.sent)
