"""Cross-model Patchscopes (Ghandeharioun et al. 2024): one model's hidden state read by another model.

The source model M runs the source prompt; its state h at layer ℓ is carried into the target model M*
by an affine map f(h) = h W + b and patched into the target prompt at layer ℓ*. The paper learns f
between models of one family (Vicuna 7B → 13B); here f is fitted by ridge least squares on paired
states: the last-token states of the same texts in both models (the texts should end at a word
boundary, where both tokenizers end a token)::

    W, b = argmin Σ_texts ‖h*_ℓ*(text) − (h_ℓ(text) W + b)‖² + λ ‖W‖²

with λ relative to the mean variance of the source features. The held-out R² of each map is kept,
so a Patchscope result can be read against how well the map itself transfers. Pass the maps to
:func:`lmscope.decoding.patchscopes.patchscope_accuracy` (``source_model=``, ``mapping=``).

Shapes: W (D_source, D_target), b (D_target,) per (source layer, target layer).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.decoding.probes import collect, resolve_layers
from lmscope.errors import InputError
from lmscope.models import Model


@dataclass(frozen=True)
class AffineMaps:
    """Maps h_target ≈ h_source W + b per (source layer, target layer); ``r2`` is each map's held-out R²."""

    W: dict[tuple[int, int], torch.Tensor]
    b: dict[tuple[int, int], torch.Tensor]
    r2: dict[tuple[int, int], float]
    source_model: str
    target_model: str

    def __call__(self, h: torch.Tensor, source_layer: int, target_layer: int) -> torch.Tensor:
        key = (source_layer, target_layer)
        if key not in self.W:
            raise InputError(f"No map was fitted from {self.source_model} layer {source_layer} to {self.target_model} "
                             f"layer {target_layer}; fitted pairs: {sorted(self.W)}.")
        return h.float() @ self.W[key] + self.b[key]


def ridge_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (Dx, Dy), b (Dy,) minimising ‖Y − (X W + b)‖² + λ n ‖W‖², with λ = ``ridge`` × the mean
    variance of the features of X."""
    X, Y = X.double(), Y.double()
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    cov = Xc.T @ Xc / len(X)
    lam = ridge * cov.diagonal().mean()
    W = torch.linalg.solve(cov + lam * torch.eye(len(cov), dtype=cov.dtype), Xc.T @ Yc / len(X))
    return W.float(), (my - mx @ W).float()


def fit_affine_maps(source: Model, target: Model, texts: Sequence[str], pairs: Sequence[tuple[int, int]], *,
                    site: str = "resid_pre", ridge: float = 1e-3, heldout: float = 0.2, seed: int = 0,
                    batch_size: int = 16) -> AffineMaps:
    """Fit one affine map per (source layer, target layer) pair on the texts' last-token states."""
    texts = list(texts)
    if not pairs:
        raise InputError("Give at least one (source layer, target layer) pair.")
    if not 0 < heldout < 1 or ridge < 0:
        raise InputError(f"heldout={heldout} must be in (0, 1) and ridge={ridge} non-negative.")
    pairs = [(resolve_layers(source, [a])[0], resolve_layers(target, [b])[0]) for a, b in pairs]
    s_layers, t_layers = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
    n_test = max(1, int(len(texts) * heldout))
    if len(texts) - n_test <= source.spec.d_model // 4:
        raise InputError(f"{len(texts)} texts are too few to fit a {source.spec.d_model}-wide map; give several "
                         "times the source width.")
    X, _ = collect(source, texts, site, s_layers, position="last", batch_size=batch_size)
    Y, _ = collect(target, texts, site, t_layers, position="last", batch_size=batch_size)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    test, train = torch.tensor(order[:n_test]), torch.tensor(order[n_test:])
    W, b, r2 = {}, {}, {}
    for ls, lt in pairs:
        W[ls, lt], b[ls, lt] = ridge_fit(X[ls][train], Y[lt][train], ridge)
        pred = X[ls][test] @ W[ls, lt] + b[ls, lt]
        y = Y[lt][test]
        r2[ls, lt] = float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    return AffineMaps(W, b, r2, source.name, target.name)


def fit_texts(n: int, corpus: str = "default", *, seed: int = 0, max_words: int = 12) -> list[str]:
    """``n`` seeded prefixes of the corpus's training documents, each ending at the end of a word (2 to
    ``max_words`` words), for fitting maps between models with different tokenizers."""
    from lmscope.data import load_corpus

    docs = [d.split() for d in load_corpus(corpus).split("train")]
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise InputError(f"The corpus {corpus!r} has no training document of two words or more.")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choice(docs)
        k = rng.randint(2, min(max_words, len(words)))
        start = rng.randint(0, len(words) - k)
        out.append(" ".join(words[start:start + k]))
    return out

