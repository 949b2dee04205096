"""The data of a run: the model's ``ModelSpec``, a tokenised ``Batch``, and a run's ``RunOutput``.

Shapes: B prompts, T tokens, D residual width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmscope.errors import InputError
from lmscope.sites import parse_site


@dataclass(frozen=True)
class ModelSpec:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int  # 0 for a model without MLPs
    d_vocab: int
    n_ctx: int
    norm: str
    post_norms: bool
    parallel: bool
    softcap: float | None = None  # final-logit soft-cap: logits = c·tanh(logits / c)
    attn_softcap: float | None = None  # attention-score soft-cap (Gemma 2)
    sliding_window: int | None = None
    d_inner: int = 0  # state-space mixer channels E (0 without one)
    d_state: int = 0  # state size N per channel


@dataclass
class Batch:
    """Tokenised prompts. ``input_ids``/``attention_mask``/``position_ids`` are (B, T)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    str_tokens: list[list[str]]
    padding_side: str = "left"

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(dim=1)

    @property
    def last_index(self) -> torch.Tensor:
        """Index of each row's last real token (B,)."""
        if self.padding_side == "left":
            return torch.full((self.input_ids.shape[0],), self.input_ids.shape[1] - 1)
        return self.lengths - 1

    def repeat(self, n: int) -> Batch:
        """n copies of the batch, set-major: copy i occupies rows i*B .. (i+1)*B - 1."""
        return Batch(self.input_ids.repeat(n, 1), self.attention_mask.repeat(n, 1),
                     self.position_ids.repeat(n, 1), self.str_tokens * n, self.padding_side)


StepInterventions = Callable[[torch.Tensor, torch.Tensor], list]
"""(absolute positions (B, t), real-token mask (B, t)) -> the interventions of one generation step."""


@dataclass
class RunOutput:
    batch: Batch
    logits: torch.Tensor | None
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    memo_slot: object = field(default=None, repr=False, compare=False)  # (RunMemo, entry) when read from a memo

    def __getitem__(self, site: str) -> torch.Tensor:
        return self.cache[parse_site(site).name] if not site.startswith("aux.") else self.cache[site]


def select_logits(logits: torch.Tensor, batch: Batch, which: str) -> torch.Tensor | None:
    """The logits of every position ("all"), each row's last real token ("last") or none ("none")."""
    if which == "all":
        return logits
    if which == "last":
        return logits[torch.arange(logits.shape[0]), batch.last_index.to(logits.device)]
    if which == "none":
        return None
    raise InputError(f"logits={which!r}: use 'all', 'last' or 'none'.")
