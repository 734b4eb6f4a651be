"""The guildtune command: storage subcommands end to end on a real data dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guildtune.cli import build_parser, main
from tests.fakes import IRC, ROOT, run_cli


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from guildtune.cli import build_parser; build_parser(); "
            "import storage; bad = [m for m in ('torch', 'transformers', 'peft') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_init_import_status_export_forget(cfg_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(cfg_file, "init") == 0
    data = tmp_path / "c.jsonl"
    lines = [{"community": "c", "part": 0, "seq": i, "time": "", "author_id": 100 + i % 2,
              "text": f"line {i}", "reply_to": [i - 1] if i else []} for i in range(6)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert run_cli(cfg_file, "import", "--guild", "7", "--learn-from-humans", str(data)) == 0
    assert "imported 6 messages by 2 members" in capsys.readouterr().out
    assert run_cli(cfg_file, "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["guilds"][0]["messages"] == 6 and status["guilds"][0]["consented_users"] == 2
    assert run_cli(cfg_file, "export", "--user", "100") == 0
    exported = json.loads(capsys.readouterr().out)
    assert len(exported["messages"]) == 3
    assert run_cli(cfg_file, "forget", "--user", "100") == 0
    assert "deleted 4 rows" in capsys.readouterr().out
    assert run_cli(cfg_file, "export", "--user", "100") == 1  # nothing of theirs is left
    assert "nothing is stored for member 100" in capsys.readouterr().err


def test_errors_are_one_line_and_nonzero(cfg_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"part": 0, "seq": 1, "author_id": 5, "text": "x", "reply_to": []}\nnope\n')
    assert run_cli(cfg_file, "import", "--guild", "1", str(bad)) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("bad.jsonl:2: not valid JSON (Expecting value)") and "\n" not in err
    assert main(["--config", str(tmp_path / "nope.toml"), "status"]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(not IRC.is_dir(), reason="shared data not present")
def test_import_a_real_community(cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(cfg_file, "import", "--guild", "3", str(IRC / "irc-rust.jsonl")) == 0
    assert "(323 reply pairs)" in capsys.readouterr().out


def test_every_command_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"guildtune {name}" in readme, f"README does not mention `guildtune {name}`"
