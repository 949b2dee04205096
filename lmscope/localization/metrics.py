"""Patching metrics: logit difference, probability, log-probability, KL to the clean run; normalisation.

Every metric maps answer-position logits ``(..., B, V)`` (any leading axes, e.g. the N cells of a
sweep) to one number per prompt ``(..., B)``; :class:`Metric` wraps one with its answer tokens and
averages over the B prompts, giving ``(...)``. Logit difference is the recommended patching metric
(Zhang & Nanda 2024): it is linear in the logits, does not saturate and shows negative components.

Normalisation (METHODS.md §0), with M_clean and M_corrupt the metric on the unpatched runs:

* denoising (patch clean values into the corrupted run): (M − M_corrupt) / (M_clean − M_corrupt),
  0 = nothing restored, 1 = clean behaviour fully restored;
* noising (patch corrupted values into the clean run): (M − M_clean) / (M_clean − M_corrupt),
  0 = no effect, −1 = behaviour destroyed.

Public API (stable; other method families import it)::

    logit_diff(logits, targets, foils) -> (..., B)
    probability(logits, targets) -> (..., B);  log_prob(logits, targets) -> (..., B)
    kl_to_clean(logits, clean_logits) -> (..., B)        # KL(clean || patched), nats, >= 0
    normalise(value, clean, corrupt, direction="denoise"|"noise")
    Metric(kind, targets, foils=None, clean_logits=None)  # __call__(logits (..., B, V)) -> (...)
    Metric.per_prompt(logits) -> (..., B)
    METRICS = ("logit_diff", "prob", "logprob", "kl")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope.errors import InputError
from lmscope.targets import canonical_metric

METRICS = ("logit_diff", "prob", "logprob", "kl")
_SPELLING = {"logit_diff": "logit_diff", "probability": "prob", "log_prob": "logprob", "kl": "kl"}  # shared -> ours


def metric_kind(metric: str, allowed: tuple[str, ...] = METRICS, method: str = "patching") -> str:
    """This module's name for ``metric`` (any name of :mod:`lmscope.targets`: 'probability', 'log_prob', ...),
    checked against ``allowed``."""
    ours = {k: v for k, v in _SPELLING.items() if v in allowed}
    return ours[canonical_metric(metric, tuple(ours), method)]


def _gather(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """logits (..., B, V), tokens (B,) -> (..., B)."""
    tokens = tokens.to(logits.device).long()
    idx = tokens.view(*([1] * (logits.ndim - 2)), -1, 1).expand(*logits.shape[:-1], 1)
    return logits.gather(-1, idx).squeeze(-1)


def logit_diff(logits: torch.Tensor, targets: torch.Tensor, foils: torch.Tensor) -> torch.Tensor:
    """logit[target] − logit[foil] per prompt: logits (..., B, V) -> (..., B)."""
    return _gather(logits.float(), targets) - _gather(logits.float(), foils)


def probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the target per prompt: (..., B, V) -> (..., B)."""
    return _gather(torch.softmax(logits.float(), dim=-1), targets)


def log_prob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probability of the target per prompt: (..., B, V) -> (..., B)."""
    return _gather(torch.log_softmax(logits.float(), dim=-1), targets)


def kl_to_clean(logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_patched) in nats per prompt: logits (..., B, V), clean_logits (B, V) -> (..., B)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    lc = torch.log_softmax(clean_logits.float().to(lp.device), dim=-1)
    return (lc.exp() * (lc - lp)).sum(-1)


def normalise(value: torch.Tensor, clean: float | torch.Tensor, corrupt: float | torch.Tensor,
              direction: str = "denoise") -> torch.Tensor:
    """Normalise a metric: denoising 0 = corrupted … 1 = clean; noising 0 = no effect … −1 = destroyed.

    Raises if the clean and corrupted metrics are equal (the pair shows no behaviour to patch).
    """
    clean, corrupt = torch.as_tensor(clean, dtype=torch.float32), torch.as_tensor(corrupt, dtype=torch.float32)
    gap = clean - corrupt
    if torch.any(gap.abs() < 1e-6):
        raise InputError(
            "The clean and corrupted runs give the same metric value, so normalised patching scores are "
            "undefined. Check that the corruption changes the answer, or pass normalise=False."
        )
    if direction == "denoise":
        return (value - corrupt) / gap
    if direction == "noise":
        return (value - clean) / gap
    raise InputError(f"direction={direction!r}: use 'denoise' or 'noise'.")


@dataclass(frozen=True, eq=False)
class Metric:
    """A metric bound to its answer tokens; ``metric(logits (..., B, V)) -> (...)`` (mean over prompts).

    ``kind``: "logit_diff" (needs ``foils``), "prob", "logprob" or "kl" (needs ``clean_logits`` (B, V);
    note KL is 0 for the clean run and grows with damage, so its normalisation uses the clean/corrupt
    KL values like any other metric).
    """

    kind: str
    targets: torch.Tensor
    foils: torch.Tensor | None = None
    clean_logits: torch.Tensor | None = None

    def __post_init__(self):
        if self.kind not in METRICS:
            object.__setattr__(self, "kind", metric_kind(self.kind))
        if self.kind == "logit_diff" and self.foils is None:
            raise InputError("The logit_diff metric needs a foil token for every prompt (e.g. --foil ' John').")
        if self.kind == "kl" and self.clean_logits is None:
            raise InputError("The kl metric needs the clean run's logits (clean_logits=).")

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., B, V) -> (..., B)."""
        if self.kind == "logit_diff":
            return logit_diff(logits, self.targets, self.foils)
        if self.kind == "prob":
            return probability(logits, self.targets)
        if self.kind == "logprob":
            return log_prob(logits, self.targets)
        return kl_to_clean(logits, self.clean_logits)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.per_prompt(logits).mean(-1)
