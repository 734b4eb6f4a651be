"""Configuration: parsed once at the entry point into frozen dataclasses and passed down.

Every section is a frozen dataclass; every field has a default, so an empty file (or no file)
gives a working configuration. A mistake fails at start with one line that names the key, the
value and what is allowed (``ConfigError``). Secrets never come from the file: the Discord token
is read from ``DISCORD_TOKEN`` and kept out of ``repr`` so it cannot leak into logs.

Over 400 lines on purpose: one frozen dataclass per config section with its validation,
the one schema config.example.toml documents; split across files it would be read in pieces.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The storage package's rules for a storage.url (one home: it opens what they accept).
from storage.postgres import is_postgres_url
from storage.postgres import redact_url as without_password

ENV_CONFIG = "GUILDTUNE_CONFIG"
ENV_TOKEN = "DISCORD_TOKEN"
ENV_MODEL_CACHE = "GUILDTUNE_MODEL_CACHE"  # the default model cache (tests and CI isolate it)


class ConfigError(ValueError):
    """A configuration mistake, worded as one line for the operator."""


# What a secret looks like, to keep it out of error messages (which reach terminals, logs and
# bug reports): a Discord bot token or a JWT (three dot-separated base64 parts), the usual API key
# prefixes (OpenAI, Stripe, GitHub, Slack, Hugging Face, AWS), or one long unbroken run of
# letters and digits. A config value is a number, a name, a path or a URL, none of which look so.
_SECRET_LIKE = re.compile(
    r"[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{16,}"
    r"|(?<![A-Za-z0-9])(?:sk|pk|rk)[-_][A-Za-z0-9_-]{16,}"
    r"|(?<![A-Za-z0-9])(?:gh[pousr]_|github_pat_|hf_|xox[abprs]-)[A-Za-z0-9_-]{10,}"
    r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|(?=[A-Za-z]*[0-9])(?=[0-9]*[A-Za-z])[A-Za-z0-9]{32,}")
REDACTED = "<redacted: looks like a token>"


def looks_like_secret(text: str) -> bool:
    """Whether ``text`` holds something shaped like a token or an API key."""
    return _SECRET_LIKE.search(text) is not None


def _shown(value: Any) -> str:
    """``value`` as an error message shows it: its repr, unless it looks like a secret."""
    text = repr(value)
    return REDACTED if looks_like_secret(text) else text


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key} = {_shown(value)} is not allowed: {allowed}")


def _positive(key: str, value: float) -> None:
    _check(value > 0, key, value, "must be > 0")


def _non_negative(key: str, value: float) -> None:
    _check(value >= 0, key, value, "must be >= 0")


def _fraction(key: str, value: float) -> None:
    _check(0 < value <= 1, key, value, "must be in (0, 1]")


@dataclass(frozen=True)
class DiscordConfig:
    reply_on_mention: bool = True
    reply_on_reply: bool = True
    channels: tuple[int, ...] = ()
    allow_dms: bool = False
    feedback: Literal["reactions", "buttons"] = "reactions"
    context_messages: int = 8
    user_rate_per_minute: int = 6
    guild_rate_per_minute: int = 30
    admin_log_channel: int = 0
    retrain_cooldown_minutes: int = 30
    feedback_per_minute: int = 20
    stream_replies: bool = True
    stream_edit_interval_s: float = 1.0
    # Sharding (bot/runner.py make_bot): 0 = one gateway connection, a plain Bot; "auto" = as
    # many shards as Discord recommends, all in this process; N = N shards in all, of which this
    # process runs shard_ids (empty: all N). Processes sharing the work share one PostgreSQL.
    shard_count: int | Literal["auto"] = 0
    shard_ids: tuple[int, ...] = ()
    # Read from the environment at load time, never from the file; hidden from repr.
    token: str = field(default="", repr=False)

    def validate(self) -> None:
        _non_negative("discord.context_messages", self.context_messages)
        _positive("discord.user_rate_per_minute", self.user_rate_per_minute)
        _positive("discord.guild_rate_per_minute", self.guild_rate_per_minute)
        _non_negative("discord.admin_log_channel", self.admin_log_channel)
        _non_negative("discord.retrain_cooldown_minutes", self.retrain_cooldown_minutes)
        _positive("discord.feedback_per_minute", self.feedback_per_minute)
        _non_negative("discord.stream_edit_interval_s", self.stream_edit_interval_s)
        self._validate_shards()

    @property
    def sharded(self) -> bool:
        """Whether the bot runs as shards (``shard_count`` "auto" or N), not one connection."""
        return self.shard_count != 0

    def _validate_shards(self) -> None:
        count, ids = self.shard_count, list(self.shard_ids)
        numeric = type(count) is int  # not a bool
        _check(count == "auto" or (numeric and count >= 0), "discord.shard_count", count,
               'the total number of shards (1 or more), "auto" (Discord decides) or 0 (no '
               "sharding)")
        if not ids:
            return
        _check(count != "auto", "discord.shard_ids", ids,
               'shard ids need a numeric discord.shard_count, not "auto" (processes that '
               "split the shards must agree on their number): set the total, e.g. 4")
        _check(count != 0, "discord.shard_ids", ids,
               "shard ids need discord.shard_count set to the total number of shards, e.g. 4")
        assert isinstance(count, int)
        bad = [i for i in ids if not 0 <= i < count]
        _check(not bad, "discord.shard_ids", ids,
               f"each id must be from 0 to {count - 1} (discord.shard_count = {count}); "
               f"out of range: {', '.join(map(str, bad))}")
        twice = sorted({i for i in ids if ids.count(i) > 1})
        _check(not twice, "discord.shard_ids", ids,
               f"each shard id once (listed more than once: {', '.join(map(str, twice))})")


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
STORAGE_URL_FORMS = ('"" (the SQLite file in storage.data_dir), a path to a SQLite file, or a '
                     "postgresql://user@host/db URL (also postgres://)")


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = ""  # empty: the user's data directory (see default_data_dir)
    # Empty: <data_dir>/guildtune.db; else a SQLite file path or a postgresql:// URL (see
    # Config.store_url). Hidden from repr: a URL may carry a password.
    url: str = field(default="", repr=False)
    busy_timeout_ms: int = 5000
    write_retries: int = 3

    def validate(self) -> None:
        _check("\x00" not in self.data_dir, "storage.data_dir", self.data_dir,
               "a directory path (it contains a NUL character)")
        self._validate_url()
        _non_negative("storage.busy_timeout_ms", self.busy_timeout_ms)
        _non_negative("storage.write_retries", self.write_retries)

    def _validate_url(self) -> None:
        url = self.url
        shown = without_password(url)
        _check("\x00" not in url, "storage.url", shown,
               f"{STORAGE_URL_FORMS} (it contains a NUL character)")
        _check(url == "" or url.strip() != "", "storage.url", shown,
               f"{STORAGE_URL_FORMS} (it is only blanks)")
        scheme = _URL_SCHEME.match(url)
        _check(scheme is None or is_postgres_url(url), "storage.url", shown,
               f"{STORAGE_URL_FORMS}; {scheme[1] if scheme else ''}:// is not supported")
        if url and scheme is None:
            # What can be told without writing: a directory there is not a database file.
            path = Path(url).expanduser()
            _check(not path.is_dir(), "storage.url", shown,
                   f"a SQLite file path, but {str(path)!r} is a directory: name the file "
                   f"in it, e.g. {str(path / 'guildtune.db')!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    system_prompt: str = (
        "You are a friendly member of this Discord community. Answer briefly, in the "
        "community's own tone."
    )
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    max_context_tokens: int = 1024
    max_batch_size: int = 8
    batch_wait_ms: int = 15
    max_resident_adapters: int = 16
    threads: int = 0
    backend: Literal["local", "vllm"] = "local"
    vllm_url: str = "http://127.0.0.1:8000"
    cache_dir: str = ""  # empty: the machine's model cache (see default_model_cache)

    def validate(self) -> None:
        _check(bool(self.name.strip()) and "\x00" not in self.name, "model.name", self.name,
               "a Hugging Face id, a local directory, 'tiny' or 'smollm2-135m'")
        _check("\x00" not in self.cache_dir, "model.cache_dir", self.cache_dir,
               "a directory path (it contains a NUL character)")
        _check(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
               "model.device", self.device, "one of auto, cpu, cuda, cuda:N, mps")
        _check(1 <= self.max_new_tokens <= 4096, "model.max_new_tokens", self.max_new_tokens,
               "an integer from 1 to 4096")
        _non_negative("model.temperature", self.temperature)
        _fraction("model.top_p", self.top_p)
        _positive("model.repetition_penalty", self.repetition_penalty)
        _check(self.max_context_tokens >= 64, "model.max_context_tokens",
               self.max_context_tokens, "must be >= 64")
        _positive("model.max_batch_size", self.max_batch_size)
        _non_negative("model.threads", self.threads)
        _non_negative("model.batch_wait_ms", self.batch_wait_ms)
        _positive("model.max_resident_adapters", self.max_resident_adapters)
        _check(self.vllm_url.startswith(("http://", "https://")), "model.vllm_url",
               self.vllm_url, "an http:// or https:// URL")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    def validate(self) -> None:
        _check(1 <= self.rank <= 256, "lora.rank", self.rank, "an integer from 1 to 256")
        _positive("lora.alpha", self.alpha)
        _check(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", list(self.target_modules),
               "a non-empty list of module names such as [\"q_proj\", \"v_proj\"]")

    def shape(self) -> dict[str, Any]:
        """The part that must be equal for two versions to share a hot-swap slot."""
        return {"rank": self.rank, "alpha": self.alpha,
                "target_modules": sorted(self.target_modules)}


# The fit pads batch widths to a multiple of this (trainer.fit.padded_width); the token budget
# must hold one padded row.
TRAIN_PAD_MULTIPLE = 32


@dataclass(frozen=True)
class TrainingConfig:
    enabled: bool = False
    schedule: str = "0 4 * * *"
    min_new_examples: int = 20
    epochs: float = 1.0
    min_steps: int = 40
    max_steps: int = 0
    learning_rate: float = 6e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 256
    max_batch_tokens: int = 0
    precision: str = "auto"
    max_examples: int = 5000
    time_budget_minutes: float = 30.0
    eval_margin: float = 0.01
    heldout_fraction: float = 0.15
    seed: int = 0
    gradient_checkpointing: bool = False
    preference_loss: bool = False
    preference_beta: float = 0.1
    preference_weight: float = 0.5
    correction_weight: float = 2.0
    strict_forget: bool = True
    lease_seconds: int = 120
    poll_seconds: float = 5.0

    @property
    def withdraw_at_once(self) -> bool:
        """Whether a forget or an opt-out stops serving a tainted version at once: with
        ``strict_forget``, and always while the operator has training off (no retrain would
        come to replace it). The store adds the same for a guild whose own switch is off."""
        return self.strict_forget or not self.enabled

    def validate(self) -> None:
        from apscheduler.triggers.cron import CronTrigger  # light import, only here

        try:
            CronTrigger.from_crontab(self.schedule, timezone="UTC")
        except ValueError as exc:
            # APScheduler's reason quotes the field it rejected: a piece of a pasted token.
            secret = looks_like_secret(self.schedule) or looks_like_secret(str(exc))
            detail = "" if secret else f" ({exc})"
            raise ConfigError(
                f"config: training.schedule = {_shown(self.schedule)} is not allowed: a 5-field "
                f"crontab in UTC such as \"0 4 * * *\"{detail}"
            ) from None
        _positive("training.min_new_examples", self.min_new_examples)
        _positive("training.epochs", self.epochs)
        _non_negative("training.min_steps", self.min_steps)
        _non_negative("training.max_steps", self.max_steps)
        _check(0 < self.learning_rate < 1, "training.learning_rate", self.learning_rate,
               "must be in (0, 1)")
        _positive("training.batch_size", self.batch_size)
        _positive("training.grad_accum", self.grad_accum)
        _check(self.max_seq_len >= 16, "training.max_seq_len", self.max_seq_len, "must be >= 16")
        row = -(-self.max_seq_len // TRAIN_PAD_MULTIPLE) * TRAIN_PAD_MULTIPLE
        _check(self.max_batch_tokens == 0 or self.max_batch_tokens >= row,
               "training.max_batch_tokens", self.max_batch_tokens,
               f"0 (auto) or at least one padded row: training.max_seq_len ({self.max_seq_len}) "
               f"rounded up to {TRAIN_PAD_MULTIPLE}, {row}")
        _check(self.precision in ("auto", "bf16", "fp32"), "training.precision",
               self.precision, 'one of "auto", "bf16", "fp32"')
        _positive("training.max_examples", self.max_examples)
        _positive("training.time_budget_minutes", self.time_budget_minutes)
        _check(0 <= self.eval_margin < 1, "training.eval_margin", self.eval_margin,
               "a relative margin in [0, 1), e.g. 0.01 for 1%")
        _check(0 < self.heldout_fraction < 0.5, "training.heldout_fraction",
               self.heldout_fraction, "must be in (0, 0.5)")
        _positive("training.preference_beta", self.preference_beta)
        _non_negative("training.preference_weight", self.preference_weight)
        _positive("training.correction_weight", self.correction_weight)
        _check(self.lease_seconds >= 10, "training.lease_seconds", self.lease_seconds,
               "must be >= 10")
        _positive("training.poll_seconds", self.poll_seconds)


@dataclass(frozen=True)
class PrivacyConfig:
    retention_days: int = 365
    max_user_share: float = 0.25
    min_own_interactions: int = 1

    def validate(self) -> None:
        _non_negative("privacy.retention_days", self.retention_days)
        _fraction("privacy.max_user_share", self.max_user_share)
        _non_negative("privacy.min_own_interactions", self.min_own_interactions)


@dataclass(frozen=True)
class Config:
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    source: str = "built-in defaults"

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).expanduser() if self.storage.data_dir \
            else default_data_dir()

    @property
    def db_path(self) -> Path:
        """The default SQLite file, ``<data_dir>/guildtune.db``; where the store really is,
        with ``storage.url`` set, is ``store_url``."""
        return self.data_dir / "guildtune.db"

    @property
    def store_url(self) -> str | Path:
        """Where the store is: ``storage.url`` as given (a ``str``) when it is a PostgreSQL
        URL, else a SQLite file ``Path``: ``storage.url`` expanded (``~``), or ``db_path``
        when it is empty."""
        url = self.storage.url
        if is_postgres_url(url):
            return url
        return Path(url).expanduser() if url else self.db_path

    def open_store(self) -> Any:
        """Open the store this config names (``store_url``) with its lock timeout and retries:
        the one way the bot, the worker and the CLI open it."""
        from storage import open_store

        return open_store(self.store_url, busy_timeout_ms=self.storage.busy_timeout_ms,
                          write_retries=self.storage.write_retries)

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def model_cache(self) -> Path:
        """Where converted base checkpoints live (``smollm2-135m``, ``tiny``): one directory
        shared by every data dir on the machine, so each is fetched and converted once.
        ``model.cache_dir`` when set, else ``default_model_cache()``."""
        return Path(self.model.cache_dir).expanduser() if self.model.cache_dir \
            else default_model_cache()

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections or single fields changed: replace(model={"name": "tiny"})."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = (dataclasses.replace(current, **value)
                             if isinstance(value, dict) else value)
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def snapshot(self) -> dict[str, Any]:
        """Config as a JSON-able dict without secrets, saved beside each adapter version."""
        out = dataclasses.asdict(self)
        out["discord"].pop("token", None)
        out["storage"]["url"] = without_password(self.storage.url)
        out.pop("source", None)
        return out

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        self._validate_model_cache()

    def _validate_model_cache(self) -> None:
        # What can be told without writing: the cache, or its nearest existing parent, is a
        # directory (a file there would fail the first conversion, minutes into a start).
        path = self.model_cache
        if self.model.cache_dir:
            where = f"model.cache_dir = {_shown(self.model.cache_dir)}"
        elif os.environ.get(ENV_MODEL_CACHE):
            where = f"{ENV_MODEL_CACHE} = {_shown(os.environ[ENV_MODEL_CACHE])}"
        else:
            where = f"the default model cache {str(path)!r}"
        try:
            blocker = next((p for p in (path, *path.parents) if p.exists()), None)
            is_dir = blocker is None or blocker.is_dir()
        except OSError:  # unreadable parents: the first conversion will say so
            return
        if not is_dir:
            what = "is a file" if blocker == path else f"is inside {str(blocker)!r}, a file"
            raise ConfigError(f"config: {where} {what}: set model.cache_dir to a directory "
                              "for converted models")


_SECTION_TYPES = {"discord": DiscordConfig, "storage": StorageConfig, "model": ModelConfig,
                  "lora": LoraConfig, "training": TrainingConfig, "privacy": PrivacyConfig}


def default_data_dir() -> Path:
    """The per-user data directory (XDG on Linux, Application Support on macOS)."""
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / "guildtune"
    home = Path.home()
    if (home / "Library" / "Application Support").is_dir():
        return home / "Library" / "Application Support" / "guildtune"
    return home / ".local" / "share" / "guildtune"


def default_model_cache() -> Path:
    """The per-machine model cache: ``$GUILDTUNE_MODEL_CACHE``, else the user cache directory
    (``$XDG_CACHE_HOME/guildtune/models``, ``~/Library/Caches/guildtune/models`` on macOS,
    ``~/.cache/guildtune/models``)."""
    explicit = os.environ.get(ENV_MODEL_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "guildtune" / "models"
    home = Path.home()
    if (home / "Library" / "Caches").is_dir():
        return home / "Library" / "Caches" / "guildtune" / "models"
    return home / ".cache" / "guildtune" / "models"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        args = typing.get_args(tp)
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        _check(value in typing.get_args(tp), key, value, _type_name(tp))
        return value
    if origin is typing.Union:  # the first member type that takes the value
        for member in typing.get_args(tp):
            try:
                return _coerce(key, value, member)
            except ConfigError:
                continue
        _check(False, key, value, _type_name(tp))
    if origin is tuple:
        _check(isinstance(value, list), key, value, _type_name(tp))
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
               "a number")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug, not a user error


def _build_section(name: str, cls: type, raw: Any) -> Any:
    _check(isinstance(raw, dict), f"[{name}]", raw, "a table of keys")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"token"}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key == "token" and name == "discord":
            raise ConfigError(
                f"config: {full} must not be in the file: set the {ENV_TOKEN} environment "
                "variable instead (a token in a file ends up in backups and commits)")
        if key not in known:
            raise ConfigError(f"config: unknown key {full} (known keys in [{name}]: "
                              f"{', '.join(sorted(known))})")
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def parse_config(data: dict[str, Any], source: str = "<dict>",
                 env: typing.Mapping[str, str] | None = None) -> Config:
    """Build and validate a Config from a parsed TOML document."""
    env = os.environ if env is None else env
    sections: dict[str, Any] = {}
    for name, raw in data.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"config: unknown section [{name}] (known sections: "
                              f"{', '.join(_SECTION_TYPES)})")
        sections[name] = _build_section(name, _SECTION_TYPES[name], raw)
    token = env.get(ENV_TOKEN, "").strip()
    discord_cfg = sections.get("discord", DiscordConfig())
    sections["discord"] = dataclasses.replace(discord_cfg, token=token)
    cfg = Config(**sections, source=source)
    cfg.validate()
    return cfg


def load_config(path: str | os.PathLike[str] | None = None,
                env: typing.Mapping[str, str] | None = None) -> Config:
    """Load the config: ``path``, else $GUILDTUNE_CONFIG, else ./config.toml, else defaults."""
    env = os.environ if env is None else env
    explicit = path or env.get(ENV_CONFIG)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} not found (given by "
                              f"{'--config' if path else ENV_CONFIG}); copy "
                              "config.example.toml there or drop the option for defaults")
    else:
        p = Path("config.toml")
        if not p.is_file():
            return parse_config({}, source="built-in defaults", env=env)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {p} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {p} is not UTF-8 text") from None
    return parse_config(data, source=str(p), env=env)

