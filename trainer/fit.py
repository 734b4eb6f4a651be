"""The LoRA fit, readable top to bottom.

    examples -> token ids + labels (loss on the final assistant turn only)
             -> length-bucketed batches (padding is not computed), widths padded to 32
             -> each batch in pieces of at most training.max_batch_tokens (same gradient)
             -> LoRA of the configured shape on the base model, frozen in bf16 where the
                machine multiplies bf16 natively (adapter and optimizer in fp32)
             -> AdamW, warmup + cosine, grad accumulation, clipping
             -> per step: forward the backbone, slice hidden states to the labelled positions,
                run lm_head only there, in slices, with its gradient computed on the way
                (no vocab-sized logits kept for the backward), weighted cross entropy
                [+ optional KTO-style preference term]
             -> stop at the step budget, the time budget, or when asked (lease lost)

Measured on this kind of CPU (bench/trainer.py, bench/README.md): slicing before lm_head and
length bucketing took SmolLM2-135M from 40-140 to 215-265 supervised tokens/s; bf16, the
token budget, the fused output layer and the fit's own attention then halved the peak memory
and raised the throughput again.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from guildtune.config import TRAIN_PAD_MULTIPLE
from guildtune.prompting import (
    TemplateTokens,
    fit_messages,
    prompt_ids_within,
    render_ids,
)

from .data import Example

if TYPE_CHECKING:
    from guildtune.config import Config

log = logging.getLogger(__name__)

IGNORE = -100
Progress = Callable[[dict[str, Any]], None]


class TrainingStopped(RuntimeError):
    """Training was told to stop (lease lost, shutdown) before it finished."""


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    weight: float
    desirable: bool = True

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class FitResult:
    model: Any  # the PeftModel, in eval mode, adapter "default"
    steps: int
    tokens: int  # supervised (labelled) tokens seen
    seq_tokens: int  # all tokens forwarded, padding excluded
    padded_tokens: int  # all tokens forwarded, padding included
    seconds: float
    losses: list[float] = field(default_factory=list)
    stopped: str | None = None  # "time budget" when cut short; None when it ran to the end

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail) if tail else float("nan")


# -- 1. tokenization ------------------------------------------------------------------------------

def _render(tokenizer: Any, chat: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    # The engine's rendering: typed template tokens stay text, in training as in serving.
    return render_ids(tokenizer, chat, add_generation_prompt=gen_prompt)


def _prompt_and_target(tokenizer: Any, chat: list[dict[str, str]]
                       ) -> tuple[list[int], list[int], bool] | None:
    """The prompt's ids, the final assistant turn's ids, and whether the prompt is the served
    one (rendered with the generation prompt, a prefix of the full chat: ChatML-style templates
    with or without {% generation %} tags); otherwise the template's assistant mask splits."""
    full = _render(tokenizer, chat, False)
    prompt = _render(tokenizer, chat[:-1], True)
    if full[:len(prompt)] == prompt:
        return prompt, full[len(prompt):], True
    enc = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = list(enc["assistant_masks"])
    last = max((i for i, m in enumerate(mask) if m), default=-1)
    if last < 0:
        return None
    start = last
    while start > 0 and mask[start - 1]:
        start -= 1
    full = list(enc["input_ids"])
    return full[:start], full[start:last + 1], False


def encode(tokenizer: Any, example: Example, max_len: int) -> Encoded | None:
    """Ids and labels: only the final assistant turn is labelled (earlier bot turns in the
    context were not necessarily liked).

    Too long for ``max_len``: the target keeps its start (three quarters of ``max_len``, or
    all the prompt leaves), and the prompt is trimmed to the rest by the rule serving uses
    (``guildtune.prompting.fit_messages``: system prompt kept, oldest turns dropped whole,
    an overlong newest turn keeps its end), so a trimmed example is a prompt the bot serves."""
    chat = example.chat()
    split = _prompt_and_target(tokenizer, chat)
    if split is None:
        return None
    prompt, target, served = split
    # Keep the end-of-turn token, drop what the template appends after it (a newline).
    eos = tokenizer.eos_token_id
    if eos is not None and eos in target:
        target = target[:target.index(eos) + 1]
    if not target:
        return None
    keep_target = min(len(target), max(max_len * 3 // 4, max_len - len(prompt)))
    target = target[:keep_target]
    budget = max_len - keep_target
    if len(prompt) > budget:
        if served:
            prompt = prompt_ids_within(tokenizer, chat[:-1], budget)
        else:
            fitted = fit_messages(chat[:-1], TemplateTokens(tokenizer), budget)
            resplit = _prompt_and_target(tokenizer, [*fitted, chat[-1]])
            prompt = resplit[0][-budget:] if resplit is not None and budget > 0 else []
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target, example.weight,
                   example.desirable)


def encode_all(tokenizer: Any, examples: Sequence[Example], max_len: int) -> list[Encoded]:
    out = [e for e in (encode(tokenizer, ex, max_len) for ex in examples) if e is not None]
    return out


# -- 2. length-bucketed batches -----------------------------------------------------------------

def bucketed_batches(items: Sequence[Encoded], batch_size: int, rng: random.Random,
                     window: int = 16) -> list[list[int]]:
    """Index batches of similar length: shuffle, sort within windows of ``window`` batches,
    chunk, shuffle the chunks. Padding stays small while order stays random."""
    idx = list(range(len(items)))
    rng.shuffle(idx)
    span = batch_size * window
    batches: list[list[int]] = []
    for start in range(0, len(idx), span):
        group = sorted(idx[start:start + span], key=lambda i: len(items[i].ids))
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


PAD_MULTIPLE = TRAIN_PAD_MULTIPLE  # batch widths the fit pads to (32); see padded_width


def padded_width(longest: int, multiple: int = 1) -> int:
    """``longest`` rounded up to ``multiple``. The fit pads to 32: a few shapes recur, so the
    allocator reuses their memory (glibc fragments on ever-new sizes: a SmolLM2 fit's RSS rose to
    3.0 GB in 35 steps, 2.4 GB padded) and bf16 matmuls get AMX-friendly sizes (no slower)."""
    return -(-longest // multiple) * multiple


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device, multiple: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, labels and per-example weights."""
    width = padded_width(max(len(e.ids) for e in items), multiple)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    att = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        labels[row, :n] = torch.tensor(e.labels)
        att[row, :n] = 1
    weights = torch.tensor([e.weight for e in items], dtype=torch.float32)
    return ids.to(device), att.to(device), labels.to(device), weights.to(device)


# -- 3. the loss at labelled positions only -------------------------------------------------------

def backbone_and_head(model: Any) -> tuple[Any, Any]:
    """The decoder stack (hidden states) and the output layer of a (possibly peft) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


HEAD_CHUNK = 512  # labelled positions per slice of vocab logits (512 x 49k x 4 B = 100 MB)


class _HeadNLL(torch.autograd.Function):
    """Negative log-likelihood of ``targets`` under ``hidden @ weight.T (+ bias)``, in slices of
    HEAD_CHUNK rows, for a frozen output layer. The gradient with respect to ``hidden`` is
    computed slice by slice in the forward ((softmax - onehot) @ weight) and only scaled in the
    backward, so no (positions x vocab) logits are kept for the backward: with a 49k vocab they
    were the largest tensors of a step (1,000 labelled positions: ~0.6 GB)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for a in range(0, hidden.shape[0], HEAD_CHUNK):
            h, t = hidden[a:a + HEAD_CHUNK], targets[a:a + HEAD_CHUNK]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll[a:a + HEAD_CHUNK] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if grad is not None:
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad[a:a + HEAD_CHUNK] = (probs.to(weight.dtype) @ weight).to(grad.dtype)
            del logits
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None


def head_nll(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of ``targets`` through the output layer ``head`` (fused and sliced when
    the layer is a frozen Linear, the plain path otherwise)."""
    weight = getattr(head, "weight", None)
    if (isinstance(head, torch.nn.Linear) and weight is not None and not weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad)):
        if torch.is_autocast_enabled(hidden.device.type):
            dt = torch.get_autocast_dtype(hidden.device.type)
            with torch.autocast(hidden.device.type, enabled=False):
                bias = head.bias.to(dt) if head.bias is not None else None
                return _HeadNLL.apply(hidden.to(dt), weight.to(dt), bias, targets)
        return _HeadNLL.apply(hidden, weight, head.bias, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def token_nll(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood at labelled positions, and each one's row index.

    lm_head runs on the labelled positions only: for replies of ~30 tokens after prompts of
    ~60, that is a third of the positions, and the vocab projection dominates small models."""
    decoder, head = backbone_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    sel = target != IGNORE
    nll = head_nll(head, hidden[:, :-1][sel], target[sel])
    rows = sel.nonzero(as_tuple=True)[0]
    return nll, rows


def _seq_logp(model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    ids, att, labels, _ = batch
    nll, rows = token_nll(model, ids, att, labels)
    return -torch.zeros(ids.shape[0], device=nll.device).index_add(0, rows, nll)


def _kto_value(r: torch.Tensor, z: torch.Tensor, desirable: torch.Tensor,
               beta: float) -> torch.Tensor:
    return torch.where(desirable, torch.sigmoid(beta * (r - z)), torch.sigmoid(beta * (z - r)))


def kto_loss(model: Any, batch: tuple[torch.Tensor, ...], desirable: torch.Tensor,
             beta: float) -> torch.Tensor:
    """KTO-style unpaired preference term (Ethayarajh et al. 2024), reference = the base model
    (the adapter disabled). r = log pi(y|x) - log ref(y|x); z = detached, clamped batch mean of r
    as the KL baseline; desirable replies are pushed above it, disliked ones below it."""
    policy = _seq_logp(model, batch)
    with torch.no_grad(), model.disable_adapter():
        ref = _seq_logp(model, batch)
    r = policy - ref
    z = r.detach().mean().clamp(min=0)
    return (1 - _kto_value(r, z, desirable, beta)).mean()


def kto_backward(model: Any, mixed: Sequence[Encoded], pad_id: int, device: torch.device,
                 beta: float, weight: float, budget: int, amp: Callable[[], Any]) -> float:
    """``weight`` x kto_loss over ``mixed``, its gradient accumulated piece by piece within the
    token budget: a no-grad pass first gives every row's reference and the batch's baseline z,
    then each piece's policy term is forwarded with the gradient. Same value as one batch."""
    pieces = token_slices(mixed, budget, PAD_MULTIPLE)
    refs: list[torch.Tensor] = []
    rs: list[torch.Tensor] = []
    with torch.no_grad():
        for piece in pieces:
            batch = collate(piece, pad_id, device, PAD_MULTIPLE)
            with amp():
                policy = _seq_logp(model, batch)
                with model.disable_adapter():
                    ref = _seq_logp(model, batch)
            refs.append(ref)
            rs.append(policy - ref)
    z = torch.cat(rs).mean().clamp(min=0)
    total = 0.0
    for piece, ref in zip(pieces, refs, strict=True):
        batch = collate(piece, pad_id, device, PAD_MULTIPLE)
        desirable = torch.tensor([e.desirable for e in piece], device=device)
        with amp():
            r = _seq_logp(model, batch) - ref
            part = weight * (1 - _kto_value(r, z, desirable, beta)).sum() / len(mixed)
        part.backward()
        total += part.item()
    return total


# -- 4. precision -------------------------------------------------------------------------------

def _cpu_has_fast_bf16() -> bool:
    """This CPU multiplies bf16 natively (AVX-512 BF16 or AMX): ~4x its fp32 matmul rate here
    (shared/FACTS.md). Without them oneDNN emulates bf16, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    import torch.backends.mkldnn
    return (("avx512_bf16" in flags or "amx_bf16" in flags)
            and torch.backends.mkldnn.is_available())


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for training and evaluation on ``device``, or None for none (fp32).

    ``auto``: bf16 on CUDA, and on a CPU with native bf16; fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


@contextmanager
def autocast(device: torch.device, precision: str = "auto", model: Any = None) -> Iterator[None]:
    """The autocast context for ``compute_dtype`` (nothing for fp32). For a peft ``model``
    it also stops peft casting each LoRA input up to the adapter's fp32 (autocast computes
    in bf16 either way: the same numbers, without a copy of every adapted layer's input)."""
    dt = compute_dtype(device, precision)
    if dt is None:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device.type, dtype=dt))
        if model is not None and hasattr(model, "peft_config"):
            from peft.helpers import disable_input_dtype_casting
            stack.enter_context(disable_input_dtype_casting(model))
        yield


TRAIN_ATTENTION = "guildtune_train"
# Model types whose attention is exactly softmax(q k^T * scale + mask) v (no softcapping, sinks
# or other terms): the fit's attention replaces theirs on a CPU; any other keeps its own.
PLAIN_ATTENTION = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _train_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **_: Any) -> tuple[torch.Tensor, None]:
    """transformers' eager attention, with the softmax kept in the compute dtype (it sums in
    fp32 inside): the eager path upcasts the weights to fp32 and keeps both copies for the
    backward, 3x the memory of this one at bf16."""
    from transformers.models.llama.modeling_llama import repeat_kv

    unknown = sorted(k for k in ("softcap", "sinks", "s_aux") if _.get(k) is not None)
    if unknown:  # training_attention swaps it in only for plain attention; refuse, never drop
        raise NotImplementedError(f"the fit's attention does not implement {', '.join(unknown)}")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(2, 3))
    if attention_mask is not None:  # additive (eager_mask): 0 or the dtype's minimum
        scores = scores + attention_mask[:, :, :, :key.shape[-2]]
    probs = torch.softmax(scores, dim=-1)
    if dropout and module.training:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@contextmanager
def training_attention(model: Any, device: torch.device) -> Iterator[None]:
    """On a CPU, ``_train_attention`` for the fit: its backward is plain matmuls, ~1.2x faster
    per step than the fused SDPA kernel's backward here (bench/trainer.py), and with batches
    cut to the token budget its attention weights stay small. A GPU keeps SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    plain = (getattr(base.config, "model_type", None) in PLAIN_ATTENTION
             and getattr(base.config, "attn_logit_softcapping", None) is None)
    if device.type != "cpu" or before not in ("sdpa", "eager") or not plain or not hasattr(
            base, "set_attn_implementation"):
        yield
        return
    AttentionInterface.register(TRAIN_ATTENTION, _train_attention)
    AttentionMaskInterface.register(TRAIN_ATTENTION, eager_mask)  # additive, causal + padding
    base.set_attn_implementation(TRAIN_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def weights_dtype(cfg: Config) -> str:
    """The dtype the trainer loads the frozen base in: bf16 when it computes in bf16 (half the
    memory, no per-step casts), unless ``model.dtype`` names one; the LoRA weights and the
    optimizer stay fp32 (peft upcasts adapters)."""
    from guildtune.models import resolve_device

    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    device, _ = resolve_device(cfg.model.device, "auto")
    return "bfloat16" if compute_dtype(device, cfg.training.precision) else "float32"


CPU_BATCH_TOKENS = 1024  # training.max_batch_tokens = 0 on a CPU: ~2 GB peak for SmolLM2-135M


def batch_token_budget(cfg: Config, device: torch.device) -> int:
    """Most tokens forwarded at once: ``training.max_batch_tokens``, or when 0 (auto) 1024 on a
    CPU (bots share small hosts) and no cut on a GPU (its memory is the fit's own)."""
    if cfg.training.max_batch_tokens > 0:
        return cfg.training.max_batch_tokens
    return CPU_BATCH_TOKENS if device.type == "cpu" else 1 << 30


def token_slices(chunk: Sequence[Encoded], max_tokens: int, multiple: int = 1
                 ) -> list[list[Encoded]]:
    """``chunk`` in consecutive pieces whose padded size (rows x longest row, rounded up to
    ``multiple``) stays within ``max_tokens``: the activation memory of a step is bounded by the
    budget, not by the longest batch. Each piece is forwarded on its own; the gradient is the
    whole batch's."""
    pieces: list[list[Encoded]] = []
    current: list[Encoded] = []
    width = 0
    for e in sorted(chunk, key=lambda e: len(e.ids)):
        w = max(width, padded_width(len(e.ids), multiple))
        if current and w * (len(current) + 1) > max_tokens:
            pieces.append(current)
            current, w = [], padded_width(len(e.ids), multiple)
        current.append(e)
        width = w
    if current:
        pieces.append(current)
    return pieces


# -- 5. the loop ---------------------------------------------------------------------------------

# Layer types peft's LoRA adapts (transformers' GPT-2 style Conv1D is matched by name).
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                torch.nn.Conv3d)


def check_target_modules(model: Any, target_modules: Sequence[str]) -> None:
    """ConfigError (one line: the key, the missing names, the names the model has) unless every
    name in ``lora.target_modules`` matches a module of ``model`` the way peft matches it (the
    full name or its last dotted parts). peft itself fails deep inside ``get_peft_model`` when
    none matches, and silently adapts fewer modules when only some do."""
    from guildtune.config import ConfigError

    modules = [(n, m) for n, m in model.named_modules() if n]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear)})
    missing, unsupported = [], []
    for t in sorted(set(target_modules)):
        found = [m for n, m in modules if n == t or n.endswith("." + t)]
        if not found:
            missing.append(t)
        elif not any(isinstance(m, _LORA_LAYERS) or type(m).__name__ == "Conv1D"
                     for m in found):
            unsupported.append(f"{t} ({type(found[0]).__name__})")
    if missing or unsupported:
        problem = (f"names modules that the model ({type(model).__name__}) does not have: "
                   f"{', '.join(missing)}" if missing else
                   f"names modules that LoRA cannot adapt: {', '.join(unsupported)}")
        raise ConfigError(f"config: lora.target_modules {problem}; its linear modules are: "
                          f"{', '.join(linear)}")


def wrap_lora(model: Any, cfg: Config) -> Any:
    """The base model with a fresh LoRA adapter of exactly the configured shape."""
    from peft import LoraConfig, get_peft_model

    from guildtune.config import ConfigError

    lc = cfg.lora
    check_target_modules(model, lc.target_modules)
    try:
        return get_peft_model(model, LoraConfig(
            r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
            target_modules=sorted(lc.target_modules), task_type="CAUSAL_LM", bias="none"))
    except ValueError as exc:  # e.g. a target that is not a layer type LoRA supports
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"config: lora = {lc.shape()} cannot be applied to the model "
                          f"({type(model).__name__}): {detail}") from exc


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warmup over min(20, 10%) steps, cosine to 10% of the peak."""
    warm = max(1, min(20, total // 10))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# The min_steps floor never passes over the data more often than this: 40 steps over 25
# examples (13 passes) ended above the base model's held-out loss on two communities of three,
# 40 over 50 (6.4 passes) was the best of the curve on all three (bench/data_curve.py).
MAX_FLOOR_PASSES = 6


def plan_steps(n_batches: int, cfg: Config) -> int:
    """``epochs`` passes over the data, but at least ``min_steps`` (a small dataset is passed
    over several times, at most ``MAX_FLOOR_PASSES``), and at most ``max_steps`` when set."""
    t = cfg.training
    per_pass = math.ceil(n_batches / t.grad_accum)
    floor = min(t.min_steps, MAX_FLOOR_PASSES * per_pass)
    steps = max(1, floor, math.ceil(t.epochs * n_batches / t.grad_accum))
    return min(steps, t.max_steps) if t.max_steps > 0 else steps


def _micro_batches(items: Sequence[Encoded], batch_size: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    while True:  # epochs: a fresh bucketing each time round
        yield from bucketed_batches(items, batch_size, rng)


def fit(model: Any, tokenizer: Any, train: Sequence[Example], cfg: Config, *,
        negatives: Sequence[Example] = (), progress: Progress | None = None,
        should_stop: Callable[[], str | None] | None = None,
        time_budget_s: float | None = None) -> FitResult:
    """Train a LoRA adapter of shape ``cfg.lora`` on ``train``; returns the peft model.

    ``progress`` gets a dict every step (step, total_steps, loss, tokens, tokens_per_s,
    elapsed_s, eta_s). ``should_stop`` is polled every step; a reason string raises
    TrainingStopped. The time budget (``time_budget_s``, else ``training.time_budget_minutes``)
    ends training early but keeps the result."""
    t = cfg.training
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    device = next(model.parameters()).device
    items = encode_all(tokenizer, train, t.max_seq_len)
    if not items:
        raise ValueError("no trainable examples (every target was empty after tokenization)")
    neg_items = encode_all(tokenizer, negatives, t.max_seq_len) if t.preference_loss else []
    use_pref = bool(neg_items) and t.preference_weight > 0

    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_lora(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.0)
    budget = batch_token_budget(cfg, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    n_batches = math.ceil(len(items) / t.batch_size)
    total = plan_steps(n_batches, cfg)
    batches = _micro_batches(items, t.batch_size, t.seed)
    pref_rng = random.Random(t.seed + 1)
    budget_s = t.time_budget_minutes * 60 if time_budget_s is None else time_budget_s
    result = FitResult(model, 0, 0, 0, 0, 0.0)
    start = time.perf_counter()
    log.info("fit: %d examples (%d negatives), %d steps of %d x %d", len(items), len(neg_items),
             total, t.batch_size, t.grad_accum)

    with training_attention(model, device):
        for step in range(total):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, t.learning_rate)
            step_loss = 0.0
            chunks = [[items[i] for i in next(batches)] for _ in range(t.grad_accum)]
            # The step's loss is the weighted mean over every labelled token of its micro-batches,
            # whatever pieces the token budget cuts them into.
            denom = sum(e.weight * e.n_target for c in chunks for e in c)
            for chunk in chunks:
                for piece in token_slices(chunk, budget, PAD_MULTIPLE):
                    ids, att, labels, weights = collate(piece, pad_id, device, PAD_MULTIPLE)
                    with autocast(device, t.precision, model):
                        nll, rows = token_nll(model, ids, att, labels)
                        part = (nll * weights[rows]).sum() / denom
                    part.backward()
                    step_loss += part.item()
                    result.tokens += nll.numel()
                    result.seq_tokens += int(att.sum())
                    result.padded_tokens += ids.numel()
                    del ids, att, labels, weights, nll, rows, part
            if use_pref:
                k = max(1, min(t.batch_size // 2, len(neg_items)))
                mixed = pref_rng.sample(neg_items, k) + pref_rng.sample(items, min(k, len(items)))
                kto_backward(model, mixed, pad_id, device, t.preference_beta,
                             t.preference_weight, budget,
                             lambda: autocast(device, t.precision, model))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            result.steps = step + 1
            result.losses.append(step_loss)
            elapsed = time.perf_counter() - start
            if progress is not None:
                progress({"step": step + 1, "total_steps": total, "loss": round(step_loss, 4),
                          "tokens": result.tokens, "tokens_per_s": round(result.tokens / elapsed, 1),
                          "elapsed_s": round(elapsed, 1),
                          "eta_s": round(elapsed / (step + 1) * (total - step - 1), 1)})
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise TrainingStopped(reason)
            if elapsed > budget_s and step + 1 < total:
                result.stopped = "time budget"
                log.warning("fit: time budget of %.1f min reached at step %d/%d",
                            budget_s / 60, step + 1, total)
                break

    result.seconds = time.perf_counter() - start
    if t.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_disable()
    model.eval()
    return result
