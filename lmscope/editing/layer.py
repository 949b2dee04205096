"""Choosing the edit layer by causal tracing (Meng et al. 2022, §2 and §3 of the paper).

Noise the subject's embeddings, restore the clean writes of the edited memory (a window of layers,
as in the paper) at the **last subject token**, and read the indirect effect (restored − corrupted
probability of the clean answer) layer by layer: the MLP outputs, or on a state-space model (Mamba)
the blocks' ``out_proj`` writes (Sen Sharma et al. 2024). The layer where it peaks is ROME's default
edit layer; any layer can be given instead. The window is 10 layers on models of more than 10
layers, and a fifth of the layers (at least 1) on smaller ones, about the paper's 10 of GPT-2 XL's 48:
a window over every layer would restore the same layers for each and choose nothing. The noise scale is passed explicitly (3 × the std of the token
embeddings over the vocabulary), so the choice does not move when the tracing default does.

Shapes: the curve is (L,) over layers.
"""

from __future__ import annotations

import torch

from lmscope.editing.rome import Fact, last_token_of
from lmscope.localization.tracing import KINDS, causal_trace
from lmscope.models import Model
from lmscope.results import Axis, Result

NOISE = 3.0  # × the std of the token embeddings over the vocabulary (passed, not the tracing default)
NOISE_BASIS = "vocab"


def trace_curve(model: Model, fact: Fact, *, samples: int = 10, noise: float = NOISE, window: int | None = None,
                seed: int = 1) -> Result:
    """Indirect effect (L,) of restoring the memory's writes (MLP outputs) at the last subject token, per layer.

    ``window`` layers are restored together (default: see the module docstring).
    ``meta`` has the chosen ``layer`` (argmax), the clean and corrupted probabilities and the answer.
    """
    start = fact.prompt.find(fact.subject)
    pos = last_token_of(model, fact.prompt, start, start + len(fact.subject))
    write = model.memory(0).write_kind
    kind = next(k for k, site in KINDS.items() if site == write)
    if window is None:
        n = model.spec.n_layers
        window = 10 if n > 10 else max(1, n // 5)
    res = causal_trace(model, fact.prompt, fact.subject, kind=kind, samples=samples, noise=noise, window=window,
                       seed=seed, positions=[pos], noise_basis=NOISE_BASIS)
    curve = res.extras["indirect_effect"][:, 0].float()
    layers = tuple(int(x) for x in res.axes[0].labels)
    best = layers[int(torch.argmax(curve))]
    return Result(curve, axes=(Axis("layer", layers),), method="edit.trace", model=model.name,
                  target=res.target, params={"samples": samples, "noise": noise, "noise_basis": NOISE_BASIS,
                                             "window": res.params["window"],
                                             "seed": seed},
                  meta={"layer": best, "position": pos, "clean_prob": res.meta["clean_prob"],
                        "corrupt_prob": res.meta["corrupt_prob"], "prompt": fact.prompt, "subject": fact.subject})


def choose_layer(model: Model, fact: Fact, **kwargs) -> int:
    """The layer where restoring the memory's write (the MLP output) at the last subject token helps most."""
    return int(trace_curve(model, fact, **kwargs).meta["layer"])
