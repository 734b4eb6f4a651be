"""Expected failures of the ``guildtune`` command: one line on stderr and a non-zero exit, never a
traceback. Also the modes of the files the command creates for members' data."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guildtune.cli import main
from tests.fakes import TINY, TINY_TRAINER, write_config

ROOT = Path(__file__).resolve().parents[1]
G = 7


def cli(capsys: pytest.CaptureFixture[str], cfg: Path, *args: str) -> tuple[int, list[str]]:
    """Run the command in-process; an unexpected exception (a traceback) fails the test."""
    rc = main(["--config", str(cfg), *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_one_line(rc: int, err: list[str], *needles: str) -> None:
    assert rc != 0
    assert len(err) == 1, err
    assert err[0].startswith("guildtune: error: ") and "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], err[0]


def community(tmp_path: Path, n: int = 4, name: str = "c.jsonl", authors: int = 2,
              **override: object) -> Path:
    rows = [{"community": "c", "part": 0, "seq": i, "time": "2026-01-01T10:00:00",
             "author_id": 100 + i % authors, "text": f"line number {i} " + "words " * 20,
             "reply_to": [i - 1] if i else []} for i in range(n)]
    rows[-1].update(override)
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


# -- community files -----------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ({"part": 10**30}, "field 'part' is out of range"),
    ({"seq": 2**64}, "field 'seq' is out of range"),
    ({"seq": -1}, "field 'seq' is out of range"),
    ({"author_id": 10**30}, "author_id is out of range"),
    ({"author_id": "9" * 30}, "author_id is out of range"),
    ({"reply_to": [10**30]}, "reply_to is out of range"),
])
def test_a_number_out_of_range_in_a_community_file(tmp_path: Path, override: dict,
                                                   needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(capsys, write_config(tmp_path, TINY), "import", "--guild", str(G),
                  str(community(tmp_path, **override)))
    assert_one_line(rc, err, "c.jsonl:4: ", needle)


def _export(tmp_path: Path, **override: object) -> Path:
    msg = {"id": "1002", "type": "Reply", "timestamp": "2026-01-01T00:01:00+00:00",
           "content": "push to main", "author": {"id": "22", "name": "bo"},
           "reference": {"messageId": "1001"}}
    msg.update(override)
    p = tmp_path / "export.json"
    p.write_text(json.dumps({"channel": {"name": "general"}, "messages": [
        {"id": "1001", "type": "Default", "timestamp": "2026-01-01T00:00:00+00:00",
         "content": "how do I deploy?", "author": {"id": "11", "name": "ann"}}, msg]}))
    return p


@pytest.mark.parametrize("override, needle", [
    ({"reference": {"messageId": "not-a-number"}}, "'reference.messageId'"),
    ({"reference": {"messageId": 12.5}}, "'reference.messageId'"),
    ({"reference": {"messageId": "9" * 30}}, "'reference.messageId' is out of range"),
    ({"id": "9" * 30}, "'id' is out of range"),
    ({"timestamp": "yesterday"}, "'timestamp' = 'yesterday' is not an ISO 8601 date-time"),
])
def test_a_bad_id_in_a_discord_export(tmp_path: Path, override: dict, needle: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(capsys, write_config(tmp_path, TINY), "import", "--guild", str(G),
                  str(_export(tmp_path, **override)))
    assert_one_line(rc, err, "export.json: messages[1]: ", needle)


# -- a damaged database --------------------------------------------------------------------

def _damage(db: Path, where: str) -> None:
    """Overwrite the root pages of some tables and their indexes with garbage, as a failing
    disk would. "data": the tables of members' data (the database opens; queries fail);
    "migrations": the migrations table (opening it fails)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    tables = "tbl_name = '_sqlite_migrations'" if where == "migrations" else \
        "tbl_name NOT IN ('_sqlite_migrations', 'imports')"
    roots = [r for (r,) in conn.execute(
        f"SELECT rootpage FROM sqlite_master WHERE rootpage > 1 AND {tables}")]
    conn.close()
    with db.open("r+b") as fh:
        for root in roots:
            fh.seek((root - 1) * page)
            fh.write(b"\xa5" * page)


@pytest.fixture(params=["data", "migrations"])
def damaged(request: pytest.FixtureRequest, tmp_path: Path,
            capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "import", "--guild", str(G),
                 str(community(tmp_path, 300))]) == 0
    db = tmp_path / "data" / "guildtune.db"
    _damage(db, request.param)
    capsys.readouterr()
    yield cfg


@pytest.mark.parametrize("args", [
    ("status",), ("status", "--json"), ("export", "--user", "100"),
    ("export", "--user", "100", "--out", "x.json"), ("forget", "--user", "100"),
    ("import", "--guild", "8", "OTHER"), ("backup", "BACKUP"),
])
def test_a_damaged_database_says_so_and_how_to_restore(
        damaged: Path, tmp_path: Path, args: tuple[str, ...],
        capsys: pytest.CaptureFixture[str]) -> None:
    args = tuple(str(community(tmp_path, 5, "other.jsonl", text="another file"))
                 if a == "OTHER" else str(tmp_path / "b.db") if a == "BACKUP" else
                 str(tmp_path / a) if a.endswith(".json") else a for a in args)
    rc, err = cli(capsys, damaged, *args)
    assert_one_line(rc, err, "guildtune.db is damaged", "guildtune restore BACKUP")


def test_a_damaged_database_prints_no_traceback(damaged: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "guildtune", "--config", str(damaged),
                           "status"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "is damaged" in proc.stderr and "guildtune restore" in proc.stderr


# -- the data directory ----------------------------------------------------------------------

def test_a_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("not a directory")
    cfg = write_config(tmp_path, TINY, storage={"data_dir": str(f)})
    for command in (("init",), ("status",), ("import", "--guild", "1",
                                             str(community(tmp_path)))):
        rc, err = cli(capsys, cfg, *command)
        assert_one_line(rc, err, "storage.data_dir", "is a file, not a directory")


def test_a_data_dir_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("not a directory")
    cfg = write_config(tmp_path, TINY, storage={"data_dir": str(f / "data")})
    rc, err = cli(capsys, cfg, "init")
    assert_one_line(rc, err, "storage.data_dir", "cannot be created: Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0500 directory anyway "
                    "(test_a_data_dir_under_a_file covers an unusable data dir)")
def test_an_unwritable_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        rc, err = cli(capsys, write_config(tmp_path, TINY, storage={"data_dir": str(d)}),
                      "init")
    finally:
        d.chmod(0o700)
    assert_one_line(rc, err, "storage.data_dir", "is not writable")


def test_a_data_dir_with_a_nul_character(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "config.toml"
    p.write_text(f'[storage]\ndata_dir = "{tmp_path}/da\\u0000ta"\n')
    rc, err = cli(capsys, p, "status")
    assert_one_line(rc, err, "config: storage.data_dir", "NUL character")


# -- LoRA target modules ---------------------------------------------------------------------

def test_lora_target_modules_the_model_does_not_have(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, TINY,
                       lora={"rank": 2, "alpha": 4, "target_modules": ["q_proj", "c_attn"]},
                       training={"enabled": True, "max_steps": 2, "batch_size": 4,
                                 "max_seq_len": 32})
    assert main(["--config", str(cfg), "import", "--guild", str(G), "--learn-from-humans",
                 str(community(tmp_path, 60))]) == 0
    capsys.readouterr()
    rc, err = cli(capsys, cfg, "train", "--guild", str(G), "--force", "--model", "tiny")
    # cli_train's progress bar draws its line ("guild 7: loading model ━━━ ...") on stderr
    # before the model is there to check; every other line counts.
    err = [line for line in err if not line.startswith(f"guild {G}: ")]
    assert_one_line(rc, err, "lora.target_modules", "c_attn", "q_proj, up_proj")
    assert "Traceback" not in "\n".join(err)


# -- modes of members' data ------------------------------------------------------------------

@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_init_creates_the_data_dir_0700(tmp_path: Path, umask_022: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "new" / "data"
    cfg = write_config(tmp_path, TINY, storage={"data_dir": str(data)})
    assert main(["--config", str(cfg), "init"]) == 0
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


def test_export_out_writes_0600(tmp_path: Path, umask_022: None,
                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "import", "--guild", str(G),
                 str(community(tmp_path))]) == 0
    out = tmp_path / "member.json"
    out.write_text("{}")
    out.chmod(0o644)  # an existing file is narrowed too
    fresh = tmp_path / "fresh.json"
    for f in (out, fresh):
        assert main(["--config", str(cfg), "export", "--user", "100", "--out", str(f)]) == 0
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert json.loads(f.read_text())["user_id"] == "100"


# -- issue 15: one error form, one exit code per kind ------------------------------------------

@pytest.mark.parametrize("args", [
    ("export", "--user", "x"), ("init", "--bogus"), ("rollback",),
    ("guild", "--guild", "7", "--training", "maybe"), ("nosuchcommand",),
])
def test_a_usage_mistake_is_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(write_config(tmp_path, TINY)), *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("guildtune: error: "), err  # no usage block
    assert "--help`" in err[0]


def test_a_config_error_of_a_discord_command_is_the_same_line_and_exit_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    rc, err = cli(capsys, write_config(tmp_path, TINY), "sync")
    assert rc == 1
    assert_one_line(rc, err, "DISCORD_TOKEN is not set")


def test_rollback_with_nothing_to_roll_back(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "init"]) == 0
    capsys.readouterr()
    rc, err = cli(capsys, cfg, "rollback", "--guild", str(G))
    assert rc == 1
    assert_one_line(rc, err, f"guild {G} is already on the base model; nothing to roll back")


def test_export_of_a_member_the_store_does_not_know(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "import", "--guild", str(G),
                 str(community(tmp_path))]) == 0
    capsys.readouterr()
    out = tmp_path / "member.json"
    assert main(["--config", str(cfg), "export", "--user", "999", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert_one_line(1, captured.err.strip().splitlines(), "nothing is stored for member 999")
    assert captured.out == "" and not out.exists()


def test_forget_of_a_member_the_store_does_not_know(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "init"]) == 0
    capsys.readouterr()
    for _ in range(2):  # safe to repeat
        assert main(["--config", str(cfg), "forget", "--user", "999"]) == 0
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nothing stored for member 999")
        assert captured.err == ""


def test_a_model_folder_that_does_not_exist(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(capsys, write_config(tmp_path, TINY), "train", "--guild", str(G), "--model",
                  "./no/such/checkpoint")
    assert_one_line(rc, err, "model.name: no such folder: ./no/such/checkpoint")
    assert "Repo id" not in err[0]


@pytest.mark.parametrize("name", ["/no/such/dir", "./nosuch", "~/no-such-model", "a/b/c"])
def test_resolve_checkpoint_says_no_such_folder(tmp_path: Path, name: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from guildtune import models
    from guildtune.models import ModelError, resolve_checkpoint

    with pytest.raises(ModelError, match=f"model.name: no such folder: {name}"):
        resolve_checkpoint(name, tmp_path)
    monkeypatch.setattr(models, "hub_reachable", lambda endpoint: None)  # the hub answers
    assert resolve_checkpoint("someone/some-model", tmp_path) == ("someone/some-model",) * 2


def test_the_error_for_a_guild_with_training_off_names_real_switches(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    from bot.cog import GuildTuneCog

    cfg = write_config(tmp_path, TINY, training={"enabled": True})
    rc, err = cli(capsys, cfg, "train", "--guild", str(G))
    assert_one_line(rc, err, f"`guildtune guild --guild {G} --training on`")
    slash = re.findall(r"`/tune (\w+) on`", err[0])
    assert slash and slash[0] in {c.name for c in GuildTuneCog.tune.commands}


def test_the_guild_switch_from_the_cli(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from storage import open_store

    cfg = write_config(tmp_path, TINY, training={"enabled": True})
    assert main(["--config", str(cfg), "init"]) == 0
    for state in ("on", "off"):
        assert main(["--config", str(cfg), "guild", "--guild", str(G), "--training",
                     state]) == 0
        assert f"guild {G}: training {state}" in capsys.readouterr().out
        with open_store(tmp_path / "data" / "guildtune.db") as store:
            assert store.guild_settings(G).training_enabled is (state == "on")


def test_the_guild_command_never_creates_the_database(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = cli(capsys, write_config(tmp_path, TINY), "guild", "--guild", str(G))
    assert_one_line(rc, err, "no database yet")
    assert not (tmp_path / "data" / "guildtune.db").exists()


def test_import_says_what_the_history_is_used_for(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from storage import open_store

    cfg = write_config(tmp_path, TINY)
    assert main(["--config", str(cfg), "import", "--guild", str(G),
                 str(community(tmp_path))]) == 0
    note = [line for line in capsys.readouterr().out.splitlines() if "trained on" in line]
    assert len(note) == 1 and "not trained on" in note[0]
    assert f"`guildtune guild --guild {G} --learn-from-humans on`" in note[0]
    assert main(["--config", str(cfg), "guild", "--guild", str(G), "--learn-from-humans",
                 "on"]) == 0
    assert "3 reply pairs are trained on" in capsys.readouterr().out
    with open_store(tmp_path / "data" / "guildtune.db") as store:
        assert store.guild_settings(G).learn_from_humans


def test_a_refused_run_prints_nothing_before_its_error_line(tmp_path: Path) -> None:
    # A subprocess: only there does the command's own logging reach stderr.
    cfg = write_config(tmp_path, TINY, training={"enabled": True})
    gt = [sys.executable, "-m", "guildtune", "--config", str(cfg)]
    data = str(community(tmp_path, 6))
    for args in (["import", "--guild", str(G), "--learn-from-humans", data],
                 ["guild", "--guild", str(G), "--training", "on"]):
        subprocess.run(gt + args, cwd=ROOT, timeout=120, check=True, capture_output=True)
    proc = subprocess.run(gt + ["train", "--guild", str(G)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 1
    assert_one_line(1, proc.stderr.strip().splitlines(), "a run needs at least 10")


# -- train now, with or without the gate ---------------------------------------------------------

@pytest.fixture
def trainable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A guild with its switch on and 24 reply pairs of 8 members; a learning rate so small
    that the candidate cannot beat the base model (the gate rejects it)."""
    cfg = write_config(tmp_path, TINY_TRAINER, training={
        **TINY_TRAINER["training"], "learning_rate": 1e-9, "max_steps": 2})
    for args in (["import", "--guild", str(G), "--learn-from-humans",
                  str(community(tmp_path, 25, authors=8))],
                 ["guild", "--guild", str(G), "--training", "on"]):
        assert main(["--config", str(cfg), *args]) == 0
    capsys.readouterr()
    return cfg


def test_a_rejected_candidate_is_exit_1_with_one_line(trainable: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--config", str(trainable), "train", "--guild", str(G)])
    captured = capsys.readouterr()
    assert_one_line(rc, captured.err.strip().splitlines(), "the new version was not kept",
                    "does not beat the base")
    assert rc == 1 and "gate: candidate loss" in captured.out  # the numbers stay on stdout


def test_skip_gate_promotes_a_rejected_candidate(trainable: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(trainable), "train", "--guild", str(G), "--skip-gate"]) == 0
    out = capsys.readouterr().out
    assert "version 1 active" in out and "gate: forced" in out


def test_skip_gate_does_not_override_the_guild_switch(trainable: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(trainable), "guild", "--guild", str(G), "--training",
                 "off"]) == 0
    capsys.readouterr()
    rc, err = cli(capsys, trainable, "train", "--guild", str(G), "--skip-gate")
    assert_one_line(rc, err, "training is off for this server")
