"""Bursty few-shot classification (Chan et al. 2022), the task of the clamping study (Singh et al. 2024).

A sequence is ``[e1, ℓ1, e2, ℓ2, q]``: two exemplar–label pairs of two different classes, then a query
exemplar whose class is one of the two (bursty). Labels are re-drawn for every sequence from K labels
(K = 5 in the paper): the K(K−1)/2 unordered label pairs are split 8:2 into training and held-out
relabelings, so the task can only be solved in context, and a model that only learnt "answer one of the
two labels in context" sits at the ln 2 plateau.

**The data differ from the paper's.** The paper embeds Omniglot characters with a ResNet-18 (512-d
features shipped with its code). Those are not installable here, so each class has a prototype drawn from
N(0, I/F) in F = 512 dimensions and each exemplar is ``prototype + noise · N(0, I/F)`` (``noise=0`` makes
every exemplar of a class identical). Each exemplar is one token of the vocabulary whose embedding is a
learned linear map of its feature vector (:class:`~lmscope.models.families.attn_only.FeatureEmbedding`);
labels are ordinary tokens ``L0 .. L{K-1}`` (ids 0..K−1), and the readout is the logits of those K tokens
at the query.

Shapes: ``ids`` (B, 5); ``target`` (B,) label ids; ``correct``/``other`` (B,) the positions (1 or 3) of the
query's label and of the distractor's label.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from lmscope.errors import InputError


@dataclass(frozen=True)
class FewShotTask:
    """Classes, labels and exemplars of the task (paper: 50 training classes, 5 labels, 1 exemplar per class)."""

    classes: int = 50
    labels: int = 5
    exemplars: int = 1
    heldout_classes: int = 20
    feature_dim: int = 512
    noise: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.classes < 2 or self.labels < 3 or self.exemplars < 1 or self.feature_dim < 1:
            raise InputError("FewShotTask needs ≥ 2 classes, ≥ 3 labels (so that label pairs can be held out), "
                             "≥ 1 exemplar per class and a positive feature_dim.")
        if self.noise < 0:
            raise InputError(f"noise={self.noise}: give a non-negative exemplar noise.")

    @property
    def n_classes(self) -> int:
        return self.classes + self.heldout_classes

    def words(self) -> list[str]:
        """The vocabulary: labels first (ids 0..K−1), then exemplar ``c{class}e{exemplar}`` tokens."""
        return [f"L{k}" for k in range(self.labels)] + [f"c{c}e{e}" for c in range(self.n_classes)
                                                       for e in range(self.exemplars + 1)]

    def features(self) -> torch.Tensor:
        """(V, F) feature vectors: zero rows for labels, prototype + noise for exemplars (the extra exemplar
        per class is held out for evaluating new exemplars)."""
        g = torch.Generator().manual_seed(self.seed)
        f = self.feature_dim
        protos = torch.randn(self.n_classes, f, generator=g) / f ** 0.5
        ex = protos[:, None] + self.noise * torch.randn(self.n_classes, self.exemplars + 1, f, generator=g) / f ** 0.5
        return torch.cat([torch.zeros(self.labels, f), ex.reshape(-1, f)])

    def exemplar_id(self, cls: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        return self.labels + cls * (self.exemplars + 1) + ex

    def label_pairs(self, split: str) -> list[tuple[int, int]]:
        """Unordered label pairs of a split: the first 80 % (in a seeded order) train, the rest held out."""
        pairs = list(itertools.combinations(range(self.labels), 2))
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.seed + 7)).tolist()
        pairs = [pairs[i] for i in order]
        cut = max(1, round(0.8 * len(pairs)))
        return pairs[:cut] if split in ("train", "new_exemplars") else pairs[cut:] if split == "heldout_labels" \
            else pairs

    def sample(self, batch: int, generator: torch.Generator, split: str = "train") -> dict[str, torch.Tensor]:
        """A batch of sequences. ``split``: ``train`` (training classes, exemplars and label pairs),
        ``heldout_labels`` (held-out label pairs), ``new_exemplars`` (the held-out exemplar of each class as
        query), ``new_classes`` (held-out classes)."""
        if split not in ("train", "heldout_labels", "new_exemplars", "new_classes"):
            raise InputError(f"split {split!r}: use train, heldout_labels, new_exemplars or new_classes.")
        g = generator
        lo, n = (self.classes, self.heldout_classes) if split == "new_classes" else (0, self.classes)
        if n < 2:
            raise InputError(f"split {split!r} needs at least 2 classes.")
        pick = torch.rand(batch, n, generator=g).argsort(-1)[:, :2] + lo  # two distinct classes
        cls_q, cls_d = pick[:, 0], pick[:, 1]
        pairs = torch.tensor(self.label_pairs(split))
        pair = pairs[torch.randint(len(pairs), (batch,), generator=g)]
        flip = torch.randint(2, (batch,), generator=g).bool()
        lab_q = torch.where(flip, pair[:, 0], pair[:, 1])
        lab_d = torch.where(flip, pair[:, 1], pair[:, 0])
        ex_ctx = torch.randint(self.exemplars, (batch, 2), generator=g)
        ex_q = torch.full((batch,), self.exemplars) if split == "new_exemplars" else \
            torch.randint(self.exemplars, (batch,), generator=g)
        q_first = torch.randint(2, (batch,), generator=g).bool()
        e_q, e_d = self.exemplar_id(cls_q, ex_ctx[:, 0]), self.exemplar_id(cls_d, ex_ctx[:, 1])
        first_e, first_l = torch.where(q_first, e_q, e_d), torch.where(q_first, lab_q, lab_d)
        second_e, second_l = torch.where(q_first, e_d, e_q), torch.where(q_first, lab_d, lab_q)
        ids = torch.stack([first_e, first_l, second_e, second_l, self.exemplar_id(cls_q, ex_q)], dim=1)
        correct = torch.where(q_first, 1, 3)
        return {"ids": ids, "target": lab_q, "correct": correct, "other": 4 - correct}
