"""Model-layer helpers for input attribution and context mixing.

* :func:`embed_parts` returns the ``embed`` site (the vector the first block sees) and its token
  part, the output of the token-embedding module. They differ by the absolute position embedding
  in GPT-2 (the ``embed`` site is token + position there); Gemma's √d scaling happens inside its
  embedding module, so both are already scaled.
* :func:`block_outputs` evaluates many intervention sets on copies of one batch up to the output
  of one block and stops there (the blocks below run once, the blocks above not at all). Value
  zeroing uses it to recompute a single layer once per zeroed token, in batched forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmscope.interventions import Intervention
from lmscope.models.parts import get_module
from lmscope.models.hooks import HookSession

if TYPE_CHECKING:
    from lmscope.models.model import Batch, Model


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def embed_parts(model: Model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embed (B, T, D), token part (B, T, D))`` for a batch, without running the blocks."""
    captured = {}

    def stop(module, args, kwargs):
        captured["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = model.block(0).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            model.forward(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    with torch.no_grad():
        token = get_module(model.hf, model.adapter.embed)(batch.input_ids.to(model.device))
    return captured["x"], token.detach()


def block_outputs(model: Model, batch: Batch, layer: int, sets: Sequence[Sequence[Intervention]], *,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Output of block ``layer`` (N, B, T, D) with each of N intervention sets applied to its own
    copy of ``batch``. Interventions must sit at ``layer`` (the blocks below run once, shared)."""
    b, t = batch.input_ids.shape
    chunk = chunk_size or max(1, 16384 // (b * t))
    parts = []
    for start in range(0, len(sets), chunk):
        group = sets[start:start + chunk]
        rows = [(slice(i * b, (i + 1) * b), iv) for i, ivs in enumerate(group) for iv in ivs]
        expand = (layer, len(group), b) if len(group) > 1 else None
        captured = {}

        def stop(module, args, output):
            captured["x"] = (output[0] if isinstance(output, tuple) else output).detach()
            raise _Stop

        with HookSession(model, (), rows, expand=expand), torch.no_grad():
            handle = model.block(layer).register_forward_hook(stop)
            try:
                model.forward(batch)
            except _Stop:
                pass
            finally:
                handle.remove()
        parts.append(captured["x"].reshape(len(group), b, t, -1))
    return torch.cat(parts)
