"""Training-time ablations and clamps (Singh et al. 2024, §9.4 of METHODS.md) as lmscope Interventions.

Every condition is a list of ordinary :mod:`lmscope.interventions` applied inside every training forward,
so gradients flow only through what is left free (a patched activation has no gradient path back to the
parameters that would have produced it). Values that depend on the sequence (ideal patterns) are built from
the batch; values that depend on the model (the Layer-1 clamp's queries and keys, the copy clamp's logits)
come from an extra forward of the same step, with gradients on, then enter the final forward as patches.
Layers are 0-based here: the paper's "layer 1" is ``blocks.0`` and its "layer 2" ``blocks.1``.

* ``ablate`` heads: ``attn.v = 0`` for those heads (the head writes nothing; none of its weights gets a gradient).
* ``preserve`` (with ``ablate``): run once without the ablation and patch the *next* layer's attention
  patterns and/or values from it, so only the ablated heads' direct path is removed.
* ``prev_token`` clamp of head ``0.h``: its pattern is ``A[t, t−1] = s``, ``A[t, t] = 1 − s``, ``A[0, 0] = 1``.
* ``layer1`` clamp: layer 0 writes nothing (``attn_out = 0``, so layer 1's values and the readout see the raw
  embedding) and layer 1's queries and keys are computed from the shifted embedding ``x[1:−1] = emb[:−2]``
  (the first position and the query keep their own).
* ``match`` clamp of head ``1.h``: the query row of its pattern is ``s`` on the correct label, ``1 − s`` on
  the other label, 0 elsewhere.
* ``copy`` clamp of head ``1.h``: the query's logits are the head's pre-softmax scores to the two labels in
  context, and ``-1e9`` for every other token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.errors import InputError
from lmscope.interventions import Ablate, Intervention, Patch
from lmscope.models import Batch, Model

CLAMPS = ("prev_token", "layer1", "match", "copy")
PRESERVE = ("none", "patterns", "values", "both")
NEG = -1e9


def as_batch(ids: torch.Tensor) -> Batch:
    """Token ids (B, T) of equal length as a Batch (no token strings: training needs none)."""
    ones = torch.ones_like(ids)
    return Batch(ids, ones, ones.cumsum(1) - 1, [[] for _ in range(ids.shape[0])])


def parse_head(text: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in str(text).replace(":", ".").split("."))
    except ValueError:
        raise InputError(f"head {text!r}: write LAYER.HEAD (0-based), e.g. 1.3.") from None
    return layer, head


@dataclass(frozen=True)
class Conditions:
    """What is ablated and clamped during training (and evaluation)."""

    ablate: tuple[str, ...] = ()
    preserve: str = "none"
    clamps: tuple[str, ...] = ()
    pt_head: str = "0.2"
    ih_head: str = "1.3"
    strength: float = 1.0

    def __post_init__(self):
        bad = [c for c in self.clamps if c not in CLAMPS]
        if bad:
            raise InputError(f"clamp(s) {bad} unknown: use {', '.join(CLAMPS)}.")
        if self.preserve not in PRESERVE:
            raise InputError(f"preserve={self.preserve!r}: use one of {PRESERVE}.")
        if not 0 <= self.strength <= 1:
            raise InputError(f"strength={self.strength}: a clamp strength is in [0, 1].")
        for h in (*self.ablate, self.pt_head, self.ih_head):
            parse_head(h)

    def check(self, model: Model) -> None:
        for h in (*self.ablate, self.pt_head, self.ih_head):
            layer, head = parse_head(h)
            if not (0 <= layer < model.spec.n_layers and 0 <= head < model.spec.n_heads):
                raise InputError(f"head {h} is outside {model.name} ({model.spec.n_layers} layers × "
                                 f"{model.spec.n_heads} heads).")

    @property
    def label(self) -> str:
        parts = list(self.clamps) + ([f"ablate {len(self.ablate)}"] if self.ablate else [])
        return " + ".join(parts) or "unclamped"


def prev_token_pattern(t: int, s: float = 1.0) -> torch.Tensor:
    """(T, T) ideal previous-token pattern: A[t, t−1] = s, A[t, t] = 1 − s, A[0, 0] = 1."""
    a = torch.diag(torch.full((t,), 1 - s)) + torch.diag(torch.full((t - 1,), s), -1)
    a[0, 0] = 1.0
    return a


def match_pattern(batch: dict[str, torch.Tensor], t: int, s: float = 1.0) -> torch.Tensor:
    """(B, 1, T, T): the query row puts s on the correct label and 1 − s on the other label."""
    b = batch["ids"].shape[0]
    a = torch.zeros(b, 1, t, t)
    rows = torch.arange(b)
    a[rows, 0, t - 1, batch["correct"]] = s
    a[rows, 0, t - 1, batch["other"]] = 1 - s
    return a


def ablations(cond: Conditions) -> list[Intervention]:
    by_layer: dict[int, list[int]] = {}
    for h in cond.ablate:
        layer, head = parse_head(h)
        by_layer.setdefault(layer, []).append(head)
    return [Ablate(f"blocks.{layer}.attn.v", heads=heads) for layer, heads in sorted(by_layer.items())]


def interventions(model: Model, cond: Conditions, batch: dict[str, torch.Tensor]) -> list[Intervention]:
    """The interventions of one training forward on ``batch`` (extra forwards with gradients where needed)."""
    ids = batch["ids"]
    t = ids.shape[1]
    ivs = ablations(cond)
    if cond.ablate and cond.preserve != "none":
        ivs += _preserved(model, ids, cond)
    if "prev_token" in cond.clamps:
        layer, head = parse_head(cond.pt_head)
        ivs.append(Patch(f"blocks.{layer}.attn.pattern", value=prev_token_pattern(t, cond.strength), heads=head))
    if "match" in cond.clamps:
        layer, head = parse_head(cond.ih_head)
        ivs.append(Patch(f"blocks.{layer}.attn.pattern", value=match_pattern(batch, t, cond.strength),
                         heads=head, positions=t - 1))
    if "layer1" in cond.clamps:
        ivs += _layer1(model, ids)
    if "copy" in cond.clamps:
        ivs.append(_copy(model, batch, ivs, cond))
    return ivs


def _preserved(model: Model, ids: torch.Tensor, cond: Conditions) -> list[Intervention]:
    """Patterns and/or values of the layer after each ablated layer, from a run without the ablation."""
    layers = sorted({parse_head(h)[0] + 1 for h in cond.ablate if parse_head(h)[0] + 1 < model.spec.n_layers})
    kinds = {"patterns": ("attn.pattern",), "values": ("attn.v",), "both": ("attn.pattern", "attn.v")}[cond.preserve]
    sites = [f"blocks.{layer}.{k}" for layer in layers for k in kinds]
    if not sites:
        return []
    clean = model.run(as_batch(ids), cache=sites, grad=torch.is_grad_enabled(), logits="none")
    return [Patch(s, value=clean[s]) for s in sites]


def _layer1(model: Model, ids: torch.Tensor) -> list[Intervention]:
    grad = torch.is_grad_enabled()
    emb = model.run(as_batch(ids), cache=["embed"], grad=grad, logits="none")["embed"]
    shifted = torch.cat([emb[:, :1], emb[:, :-2], emb[:, -1:]], dim=1)
    sites = ["blocks.1.attn.q", "blocks.1.attn.k"]
    qk = model.run(as_batch(ids), cache=sites, grad=grad, logits="none",
                   interventions=[Ablate("blocks.0.attn_out"), Patch("blocks.1.resid_pre", value=shifted)])
    return [Ablate("blocks.0.attn_out"), *(Patch(s, value=qk[s]) for s in sites)]


def _copy(model: Model, batch: dict[str, torch.Tensor], ivs: Sequence[Intervention], cond: Conditions) -> Patch:
    layer, head = parse_head(cond.ih_head)
    ids = batch["ids"]
    b, t = ids.shape
    sites = [f"blocks.{layer}.attn.q", f"blocks.{layer}.attn.k"]
    run = model.run(as_batch(ids), cache=sites, interventions=ivs, grad=torch.is_grad_enabled(), logits="none")
    scores = model.attention_scores(layer, run[sites[0]], run[sites[1]])[:, head, t - 1]  # (B, T)
    rows = torch.arange(b)
    logits = torch.full((b, t, model.spec.d_vocab), NEG)
    logits = logits.index_put((rows, torch.full((b,), t - 1), ids[rows, batch["correct"]]),
                              scores[rows, batch["correct"]])
    logits = logits.index_put((rows, torch.full((b,), t - 1), ids[rows, batch["other"]]),
                              scores[rows, batch["other"]])
    return Patch("logits", value=logits, positions=t - 1)
