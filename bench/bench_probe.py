"""Benchmark: probe training time on 100k activation vectors (width 576, SmolLM2's residual width).

The vectors are synthetic (a planted direction plus anisotropic Gaussian noise), so the figure measures
the probe fitters, not harvesting. Records fit times for the logistic (L-BFGS), ridge (closed form)
and mass-mean probes, their training accuracy, and a 5-fold cross-validation of the logistic probe.
Each fit is checked against a reference: ridge against a least-squares solve of the same penalised
problem (QR, float64), mass-mean against the class means written out, logistic against the first-order
optimality condition of its objective (the gradient vanishes at the optimum).
"""

from __future__ import annotations

import torch

from lmscope.decoding.probes import ProbeConfig, cross_validate, fit_probe

from common import check, finish, interleaved, quick, record

N, D = quick(100_000, 5_000), 576


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g) * torch.linspace(0.2, 3.0, D)
    w = torch.randn(D, generator=g)
    w = w / w.norm()
    y = ((X @ w + 0.3 * torch.randn(N, generator=g)) > 0).long()
    return X, y, w


def _standardise(X):
    mu, sd = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)
    return (X - mu) / sd, mu, sd


def ridge_reference(X, y, l2: float) -> torch.Tensor:
    """Logits (N, 2) of min ‖Z W + b − (Y − ȳ)‖² + l2·N·‖W‖² on standardised Z, by QR least squares."""
    Z, _, _ = _standardise(X.double())
    Y = torch.nn.functional.one_hot(y, 2).double()
    ym = Y.mean(0)
    A = torch.cat([Z, (l2 * len(y)) ** 0.5 * torch.eye(Z.shape[1], dtype=torch.float64)])
    B = torch.cat([Y - ym, torch.zeros(Z.shape[1], 2, dtype=torch.float64)])
    W = torch.linalg.lstsq(A, B).solution
    return Z @ W + ym


def mean_diff_reference(X, y) -> torch.Tensor:
    """Logit of class 1 minus class 0: d·x − d·(m0 + m1)/2 with d = m1 − m0."""
    X = X.double()
    m0, m1 = X[y == 0].mean(0), X[y == 1].mean(0)
    d = m1 - m0
    return X @ d - d @ (m0 + m1) / 2


def logistic_gradient(X, y, probe, l2: float) -> torch.Tensor:
    """The gradient of the logistic probe's objective (cross-entropy + l2/2 ‖W‖² on standardised features) at the
    fitted weights, written in the standardised space: zero at the optimum."""
    Z, mu, sd = _standardise(X.double())
    W = (probe.weight.double() * sd).T.clone().requires_grad_(True)
    b = (probe.bias.double() + (mu / sd) @ W.detach()).clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(Z @ W + b, y) + 0.5 * l2 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(loss, [W, b])
    return torch.cat([gW.flatten(), gb])


def main() -> None:
    X, y, _ = data()
    cfgs = {kind: ProbeConfig(kind=kind) for kind in ("logistic", "ridge", "mean_diff")}
    sides = {kind: (lambda c=cfg: fit_probe(X, y, c)) for kind, cfg in cfgs.items()}
    sides["logistic_cv5"] = lambda: cross_validate(X, y, cfgs["logistic"])
    times, out = interleaved(sides, warmup=False)
    figures = {f"{kind}_train_acc": round(out[kind].accuracy(X, y), 4) for kind in cfgs}
    figures["logistic_cv5_acc"] = round(out["logistic_cv5"]["accuracy"], 4)
    ridge, md = out["ridge"], out["mean_diff"]
    checks = [
        # float32 weights from a float64 normal-equations solve against a float64 QR solve of the same problem:
        # logits (~0.5) agree to float32 rounding of X @ W over 576 terms (~1e-6); 1e-4 leaves margin.
        check("ridge logits vs least-squares (QR) solve", ridge.logits(X), ridge_reference(X, y, cfgs["ridge"].l2),
              atol=1e-4, why="float32 weights against a float64 QR solve: rounding of 576-term dot products ~1e-6"),
        # float32 class means against float64 ones; margins reach ~30, so 1e-5 of the largest plus 1e-4
        check("mass-mean logit difference vs class means", md.logits(X)[:, 1] - md.logits(X)[:, 0],
              mean_diff_reference(X, y), atol=1e-4, rtol=1e-5,
              why="float32 means of 50k rows against float64: relative rounding ~1e-6 of margins up to ~30"),
        # L-BFGS stops when the largest gradient entry is below 1e-6 (or after max_iter=200 iterations; seen
        # 6.5e-7 here). 1e-5 allows the float32 weights; larger means the fit stopped short of its optimum.
        check("logistic objective gradient at the fit (first-order optimality)",
              logistic_gradient(X, y, out["logistic"], cfgs["logistic"].l2), torch.zeros(2 * D + 2), atol=1e-5,
              why="L-BFGS stops at a max gradient entry of 1e-6 (seen 6.5e-7) or after 200 iterations; 1e-5 allows "
                  "float32 weights, larger means the fit is not at its optimum"),
    ]
    work = {"logistic": "fit_probe(kind='logistic'): standardise, L-BFGS (≤ 200 iterations) on cross-entropy + L2",
            "ridge": "fit_probe(kind='ridge'): standardise, one 576 × 576 float64 solve",
            "mean_diff": "fit_probe(kind='mean_diff'): two class means",
            "logistic_cv5": "cross_validate(): 5 logistic fits on 80% each, accuracy on the rest"}
    record("probe_training", work=work, timings=times, checks=checks, n_vectors=N, width=D, **figures)


if __name__ == "__main__":
    main()
    finish()
