"""Benchmark: probe training time on 100k activation vectors (width 576, SmolLM2's residual width).

The vectors are synthetic (a planted direction plus anisotropic Gaussian noise), so the figure measures
the probe fitters, not harvesting. Records fit times for the logistic (L-BFGS), ridge (closed form)
and mass-mean probes, their training accuracy, and a 5-fold cross-validation of the logistic probe.
"""

from __future__ import annotations

import time

import torch

from lmscope.decoding.probes import ProbeConfig, cross_validate, fit_probe

from common import best_time, record

N, D = 100_000, 576


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g) * torch.linspace(0.2, 3.0, D)
    w = torch.randn(D, generator=g)
    w = w / w.norm()
    y = ((X @ w + 0.3 * torch.randn(N, generator=g)) > 0).long()
    return X, y, w


def main() -> None:
    X, y, w = data()
    figures = {}
    for kind in ("logistic", "ridge", "mean_diff"):
        cfg = ProbeConfig(kind=kind)
        t = best_time(lambda: fit_probe(X, y, cfg), repeats=2, warmup=0)
        probe = fit_probe(X, y, cfg)
        figures[f"{kind}_fit_s"] = round(t, 3)
        figures[f"{kind}_train_acc"] = round(probe.accuracy(X, y), 4)
    t0 = time.perf_counter()
    cv = cross_validate(X, y, ProbeConfig(kind="logistic"))
    figures["logistic_cv5_s"] = round(time.perf_counter() - t0, 3)
    figures["logistic_cv5_acc"] = round(cv["accuracy"], 4)
    record("probe_training", n_vectors=N, width=D, **figures)


if __name__ == "__main__":
    main()
