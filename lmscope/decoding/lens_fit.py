"""Least-squares translators for the tuned lens (Din et al. 2023, "Jump to Conclusions: Short-Cutting
Transformers with Linear Transformations").

Each hidden state h^l is mapped to the last block's output h^L by the affine map that minimises the
squared error over the tokens of a corpus,

    W_l, c_l = argmin Σ_t ‖h^L_t − (W_l h^l_t + c_l)‖²,   W_l = Cov(h^l)^{-1} Cov(h^l, h^L),

which needs only the first and second moments of the hidden states: forward passes, no backward,
no unembedding. The moments are streamed over batches (each batch's products in float32 about a
fixed shift, the sums in float64), so 10⁵–10⁶ tokens cost forward passes only. A small ridge
``ridge · mean(diag Cov(h^l))`` keeps the solve well conditioned. In the tuned lens's residual
parameterisation the translator is A_l = W_l − I, b_l = c_l; the KL objective can then fine-tune it
(:func:`lmscope.decoding.tuned_lens.train_tuned_lens` with ``init``).

``target="raw"`` (the default) is Din et al.'s h^L. ``target="normed"`` regresses onto h^L / rms(h^L),
what the final norm sees before its weight (the final norm removes the scale anyway, and this keeps the
few tokens with very large residual norms from dominating the squared error). Chosen by measurement:
on SmolLM2-135M raw gave slightly lower held-out KL (README).

Shapes: hidden states (k, N, D) per batch; moments (k, D, D); the result is a :class:`TunedLens`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lmscope.decoding.tuned_lens import TunedLens, hidden_sites
from lmscope.errors import InputError

TARGETS = ("raw", "normed")


class Moments:
    """Streaming sums Σx, Σy, Σxxᵀ, Σxyᵀ of k inputs x (k, N, D) against one output y (N, D)."""

    def __init__(self):
        self.n = 0
        self.shift_x = self.shift_y = None

    def add(self, x_kND: torch.Tensor, y_ND: torch.Tensor) -> None:
        if self.shift_x is None:  # shifting by the first batch's means keeps the float32 products accurate
            self.shift_x, self.shift_y = x_kND.mean(1, keepdim=True).float(), y_ND.mean(0).float()
            k, d = x_kND.shape[0], x_kND.shape[-1]
            self.sx, self.sy = torch.zeros(k, d, dtype=torch.float64), torch.zeros(y_ND.shape[-1], dtype=torch.float64)
            self.sxx = torch.zeros(k, d, d, dtype=torch.float64)
            self.sxy = torch.zeros(k, d, y_ND.shape[-1], dtype=torch.float64)
        x = x_kND.float() - self.shift_x
        y = (y_ND.float() - self.shift_y)
        xt = x.transpose(1, 2)
        self.sxx += (xt @ x).double()
        self.sxy += (xt @ y).double()
        self.sx += x.sum(1).double()
        self.sy += y.sum(0).double()
        self.n += y.shape[0]

    def solve(self, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """W (k, D, D_out) and c (k, D_out) with y ≈ x W + c, the (ridge) least-squares fit on the data seen."""
        if self.n < 2:
            raise InputError("Least squares needs at least 2 tokens; give more tokens or contexts.")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.sxx / self.n - mx[:, :, None] * mx[:, None, :]
        cxy = self.sxy / self.n - mx[:, :, None] * my[None, None, :]
        diag = cxx.diagonal(dim1=1, dim2=2)
        reg = ridge * diag.mean(-1).clamp_min(1e-30)
        a = cxx + reg[:, None, None] * torch.eye(cxx.shape[-1], dtype=cxx.dtype)
        # one symmetric positive-definite solve per layer (batched LU failed inside MKL on these matrices)
        w = torch.stack([_spd_solve(a[i], cxy[i]) for i in range(len(a))])
        shift_x, shift_y = self.shift_x.double().squeeze(1), self.shift_y.double()
        c = (my + shift_y)[None] - ((mx + shift_x)[:, None, :] @ w).squeeze(1)
        return w, c


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹ b for symmetric positive semi-definite a; the minimum-norm least-squares solution when a is singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def fit_lens_least_squares(model, corpus="default", *, tokens: int = 2**16, context: int = 128,
                           batch_contexts: int = 8, layers=None, ridge: float = 1e-4, target: str = "raw",
                           contexts: torch.Tensor | None = None, progress: bool = True) -> TunedLens:
    """A tuned lens whose translators are the least-squares maps from each hidden state to the last one.

    Streams the train split of ``corpus`` (or given (N, T) ``contexts``), first position of each
    context left out as in training and evaluation. ``layers`` as in :func:`train_tuned_lens`.
    """
    if target not in TARGETS:
        raise InputError(f"target={target!r}: use one of {', '.join(TARGETS)}.")
    if ridge < 0 or batch_contexts < 1:
        raise InputError("ridge must be non-negative and batch_contexts positive.")
    if contexts is None:
        from lmscope.data import token_contexts

        contexts = token_contexts(model, corpus, context, "train", max_tokens=tokens)
    lens = TunedLens.for_model(model, layers)
    n = model.spec.n_layers
    sites = hidden_sites(n)
    moments = Moments()
    starts = range(0, len(contexts), batch_contexts)
    for b in tqdm(starts, desc="tuned lens (least squares)", unit="batch", disable=not progress):
        with torch.no_grad():
            run = model.run(contexts[b:b + batch_contexts], cache=[sites[i] for i in (*lens.trained, n)],
                            logits="none")
            d = model.spec.d_model
            xs = torch.stack([run[sites[i]][:, 1:].reshape(-1, d) for i in lens.trained])
            y = run[sites[n]][:, 1:].reshape(-1, d).float()
            if target == "normed":
                y = y * y.pow(2).mean(-1, keepdim=True).add(1e-12).rsqrt()
            moments.add(xs, y)
    return lens_from_moments(lens, moments, ridge, {"context": int(contexts.shape[1]), "target": target})


def lens_from_moments(lens: TunedLens, moments: Moments, ridge: float, info: dict | None = None) -> TunedLens:
    """Set ``lens``'s trained translators to the least-squares maps of ``moments`` (inputs in the order of
    ``lens.trained``) and record the fit in ``lens.info["lstsq"]``; returns the lens."""
    w, c = moments.solve(ridge)
    if w.shape[0] != len(lens.trained):
        raise InputError(f"The moments hold {w.shape[0]} inputs but the lens trains {len(lens.trained)} layers.")
    with torch.no_grad():
        eye = torch.eye(lens.d_model, dtype=torch.float64)
        for k, i in enumerate(lens.trained):
            t = lens.translators[i]
            t.weight.copy_((w[k].T - eye).to(t.weight.dtype))  # Linear computes h·weightᵀ: weight = Wᵀ − I
            t.bias.copy_(c[k].to(t.bias.dtype))
    lens.info = {"lstsq": {"tokens": moments.n, "ridge": ridge, **(info or {})}}
    return lens
