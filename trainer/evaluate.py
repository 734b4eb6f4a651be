"""Held-out evaluation and the promotion gate.

Per-token loss on the held-out split, for the base model (adapter disabled), the guild's active
version (loaded beside the candidate on the same base) and the candidate. The gate promotes only
a candidate that beats the base and beats the active version by ``eval_margin`` (relative).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import Example
from .fit import autocast, bucketed_batches, collate, encode_all, token_nll

log = logging.getLogger(__name__)


@torch.no_grad()
def heldout_loss(model: Any, tokenizer: Any, examples: Sequence[Example], *, max_seq_len: int,
                 batch_size: int = 16) -> tuple[float, int]:
    """Mean negative log-likelihood per target token (unweighted) and the token count."""
    items = encode_all(tokenizer, examples, max_seq_len)
    if not items:
        return float("nan"), 0
    device = next(model.parameters()).device
    # The fit's precision: a base loaded in bf16 (fit.weights_dtype) is computed in bf16.
    bf16 = model.get_input_embeddings().weight.dtype == torch.bfloat16
    precision = "bf16" if bf16 else "fp32"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in bucketed_batches(items, batch_size, random.Random(0)):
        ids, att, labels, _ = collate([items[i] for i in batch], pad_id, device)
        with autocast(device, precision, model):
            nll, _ = token_nll(model, ids, att, labels)
        total += float(nll.double().sum())
        count += nll.numel()
    model.train(was_training)
    return total / count, count


def base_loss(peft_model: Any, tokenizer: Any, examples: Sequence[Example],
              max_seq_len: int) -> float:
    """Loss of the base model: the same weights with every adapter disabled."""
    with peft_model.disable_adapter():
        return heldout_loss(peft_model, tokenizer, examples, max_seq_len=max_seq_len)[0]


def adapter_loss(peft_model: Any, tokenizer: Any, examples: Sequence[Example], path: str,
                 max_seq_len: int, name: str = "evaluated") -> float:
    """Loss with the adapter saved at ``path`` loaded beside the current one."""
    current = peft_model.active_adapter
    peft_model.load_adapter(path, adapter_name=name)
    try:
        peft_model.set_adapter(name)
        return heldout_loss(peft_model, tokenizer, examples, max_seq_len=max_seq_len)[0]
    finally:
        peft_model.set_adapter(current)
        peft_model.delete_adapter(name)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(candidate: float, base: float, active: float | None, margin: float,
         force: bool = False, candidate_vs_active: float | None = None) -> GateDecision:
    """Promote when the candidate beats the base and the active version by ``margin``.

    ``candidate_vs_active``: the candidate's loss on the examples the active version was judged
    on (those it cannot have trained on, ``pipeline.unseen_by``), when not all of them."""
    if force:
        return GateDecision(True, "forced by an admin")
    if not candidate < base:
        return GateDecision(False, f"candidate loss {candidate:.4f} does not beat the base "
                                   f"model's {base:.4f}")
    mine = candidate if candidate_vs_active is None else candidate_vs_active
    if active is not None and not mine <= active * (1 - margin):
        return GateDecision(False, f"candidate loss {mine:.4f} does not beat the active "
                                   f"version's {active:.4f} by {margin:.1%}")
    return GateDecision(True, "candidate beats the base" +
                        ("" if active is None else " and the active version"))
