"""Atomic publication of an adapter version.

``<adapters_dir>/<guild>/<version>/`` appears in one ``rename``: everything is written and
fsynced in a hidden temp dir beside it first, so a reader (the engine) sees either no directory
or a complete one. The registry row (with contributors) is written and activated in one store
transaction after the rename; a crash between the two leaves an unregistered directory, which
the next publish of that version number moves out of the way. What the directory holds (file
names, metadata) is guildtune/adapter_dir.py's contract, which the engines validate against.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guildtune.adapter_dir import adapter_meta, write_meta, write_snapshot
from storage import fsync_path, utc_now

if TYPE_CHECKING:
    from guildtune.config import Config
    from storage import AdapterVersion, Store

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):  # files before their dirs
        fsync_path(p)
    fsync_path(root)


def guild_dir(cfg: Config, guild_id: int) -> Path:
    return cfg.adapters_dir / str(guild_id)


def clean_temp_dirs(cfg: Config, guild_id: int | None = None) -> int:
    """Remove temp dirs left by a killed publisher (never visible as versions). Returns count.
    Call only when no publisher of that guild is running (the worker does, at start)."""
    roots = [guild_dir(cfg, guild_id)] if guild_id is not None else (
        [p for p in cfg.adapters_dir.iterdir() if p.is_dir()] if cfg.adapters_dir.is_dir()
        else [])
    n = 0
    for root in roots:
        if root.is_dir():
            for tmp in root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(tmp, ignore_errors=True)
                n += 1
    return n


def write_version_dir(peft_model: Any, final: Path, meta: dict[str, Any],
                      snapshot: dict[str, Any]) -> Path:
    """Save adapter + metadata (the files of guildtune/adapter_dir.py's contract) into a temp dir
    beside ``final``, fsync, rename. Returns final."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        # Only the trained adapter ("default"); an evaluated active version may be loaded too.
        peft_model.save_pretrained(tmp, selected_adapters=[peft_model.active_adapter])
        write_meta(tmp, meta)
        write_snapshot(tmp, snapshot)
        _fsync_tree(tmp)
        if final.exists():
            # A dir without a registry row: a crash after rename, before register. Not served
            # by anyone (the engine follows the registry), so it can go.
            orphan = final.parent / f"{TMP_PREFIX}orphan-{final.name}-{os.getpid()}"
            os.rename(final, orphan)
            shutil.rmtree(orphan, ignore_errors=True)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish(store: Store, cfg: Config, guild_id: int, peft_model: Any, *, base_model: str,
            metrics: dict[str, Any], data_fingerprint: str, contributors: dict[int, int],
            run_id: int | None = None, activate: bool = True,
            dataset_utc: str | None = None) -> AdapterVersion:
    """Write the next version of the guild atomically, then register (and activate) it in one
    store transaction. The previous version stays on disk and in the registry for rollback.

    The store refuses (ConsentChangedError) a version whose contributors are no longer all
    opted in since ``dataset_utc``; its directory is then removed: it is not kept at all."""
    version = store.next_version(guild_id)
    final = guild_dir(cfg, guild_id) / str(version)
    meta = adapter_meta(guild_id=guild_id, version=version, base_model=base_model,
                        lora=cfg.lora.shape(), metrics=metrics, data_fingerprint=data_fingerprint,
                        created_utc=utc_now(), run_id=run_id)
    write_version_dir(peft_model, final, meta, cfg.snapshot())
    try:
        record = store.register_version(
            guild_id, version, str(final), base_model=base_model, lora=cfg.lora.shape(),
            metrics=metrics, config=cfg.snapshot(), data_fingerprint=data_fingerprint,
            contributors=contributors, run_id=run_id, activate=activate,
            dataset_utc=dataset_utc)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    log.info("guild %s: published version %s at %s (active=%s)", guild_id, version, final,
             activate)
    return record
