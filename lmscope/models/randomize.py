"""A copy of a model with some blocks re-initialised: the model-parameter randomisation of the
sanity checks of Adebayo et al. (2018) ("Sanity Checks for Saliency Maps").

Every weight matrix (tensors with two or more axes) of the chosen blocks is redrawn from a normal
distribution with mean 0 and the original tensor's standard deviation, so activations keep their
scale while everything the block learned is gone; 1-D tensors (norm gains, biases) are kept. The
original model is not touched. An explanation method that is faithful to the model must give
different attributions on the copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from lmscope.errors import InputError
from lmscope.models.model import Model
from lmscope.models.parts import get_module


def randomized_copy(model: Model, layers: Iterable[int], seed: int = 0) -> Model:
    """A new :class:`Model` whose blocks ``layers`` have re-initialised weight matrices (seeded)."""
    layers = sorted(set(int(x) for x in layers))
    n = model.spec.n_layers
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise InputError(f"layers={layers}: give block indices between 0 and {n - 1}.")
    hf = copy.deepcopy(model.hf)
    blocks = get_module(hf, model.adapter.layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for p in blocks[layer].parameters():
                if p.ndim >= 2:
                    std = float(p.float().std())
                    p.copy_((torch.randn(p.shape, generator=gen) * std).to(p.dtype))
    name = f"{model.name} (blocks {layers[0]}–{layers[-1]} re-initialised, seed {seed})"
    return Model(hf, model.tokenizer, name, check=False)
