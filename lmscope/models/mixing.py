"""Model-layer helpers for input attribution, context mixing and harvesting: forwards stopped early.

* :func:`embed_parts` returns the ``embed`` site (the vector the first block sees) and its token
  part, the output of the token-embedding module. They differ by the absolute position embedding
  in GPT-2 (the ``embed`` site is token + position there); Gemma's √d scaling happens inside its
  embedding module, so both are already scaled.
* :func:`run_until` caches one site in a forward that stops at the block producing it (activation
  stores harvest sites this way).
* :func:`block_outputs` evaluates many intervention sets on copies of one batch up to the output
  of one block and stops there (the blocks below run once, the blocks above not at all). Value
  zeroing uses it to recompute a single layer once per zeroed token, in batched forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmscope.interventions import Intervention
from lmscope.models.hooks import HookSession
from lmscope.models.parts import get_module
from lmscope.sites import Site, parse_site

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

    norm = model.adapter.embedding.norm  # RWKV: the stream starts after block 0's norm of the embeddings
    if norm is None:
        handle = model.block(0).register_forward_pre_hook(stop, with_kwargs=True)
    else:
        handle = get_module(model.block(0), norm).register_forward_hook(lambda m, args, out: stop(m, (out,), {}))
    try:
        with torch.no_grad():
            model.forward(batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"], model.embed_tokens(batch.input_ids).detach()


def run_until(model: Model, batch: Batch, site: str | Site) -> torch.Tensor:
    """``site``'s activations for ``batch`` (its cached shape), from a forward that stops at the block
    producing the site (before it for ``embed``/``resid_pre``; logits and ``final.scale`` need it all)."""
    site = parse_site(site, model.spec.n_layers)
    stop = 0 if site.kind == "embed" else site.layer
    handle = None

    def halt(module, *args):
        raise _Stop

    with torch.no_grad(), model.hooks(cache=[site]) as session:
        if stop is not None:  # registered after the session's hooks, so those run first
            block = model.block(stop)
            # known before the block runs (unless block 0 normalises the embeddings first: RWKV)
            early = site.kind in ("embed", "resid_pre") and not (stop == 0 and model.adapter.embedding.norm)
            handle = block.register_forward_pre_hook(halt) if early else block.register_forward_hook(halt)
        try:
            model.forward(batch)
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()
    return session.cache[site.name]


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
