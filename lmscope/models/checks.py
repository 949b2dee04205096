"""Load-time checks: every site fires with the expected shape, the explicit attention path matches
the native kernel, the residual decomposition adds up to the model's own final residual, and the
read-out (final norm, unembedding, soft-cap) of that residual gives the model's own logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lmscope.errors import ModelCheckError
from lmscope.models.adapters import apply_frozen_norm, norm_bias
from lmscope.models.decompose import decompose_cache, decomposition_sites
from lmscope.sites import LAYER_KINDS, site_names

if TYPE_CHECKING:
    from lmscope.models.model import Model

PROBE = "The quick brown fox jumps over the lazy dog"
DECOMPOSITION_RTOL = 1e-4


def expected_shape(model: Model, kind: str, b: int, t: int) -> tuple[int, ...]:
    s = model.spec
    return {
        "embed": (b, t, s.d_model), "resid_pre": (b, t, s.d_model), "resid_mid": (b, t, s.d_model),
        "resid_post": (b, t, s.d_model), "attn_out": (b, t, s.d_model), "mlp_out": (b, t, s.d_model),
        "attn.q": (b, t, s.n_heads, s.d_head), "attn.k": (b, t, s.n_heads, s.d_head),
        "attn.v": (b, t, s.n_heads, s.d_head), "attn.z": (b, t, s.n_heads, s.d_head),
        "attn.pattern": (b, s.n_heads, t, t), "attn.head_out": (b, t, s.n_heads, s.d_model),
        "mlp.post": (b, t, s.d_mlp), "final.scale": (b, t, 1), "logits": (b, t, s.d_vocab),
    }[kind]


def all_sites(model: Model) -> list[str]:
    kinds = [k for k in LAYER_KINDS if not (model.spec.parallel and k == "resid_mid")]
    sites = ["embed", "final.scale", "logits"]
    for kind in kinds:
        sites += site_names(kind, model.spec.n_layers)
    return sites


def check_model(model: Model) -> None:
    """Raise :class:`ModelCheckError` unless the model's sites and decomposition behave."""
    batch = model.encode(PROBE)
    b, t = batch.input_ids.shape
    with torch.no_grad():
        plain = model.forward(batch).logits.float()
        run = model.run(batch, cache=all_sites(model) + decomposition_sites(model), logits="all")
    for name, value in run.cache.items():
        if name.startswith("aux."):
            continue
        kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        want = expected_shape(model, kind, b, t)
        if tuple(value.shape) != want:
            raise ModelCheckError(f"{model.name}: site {name} has shape {tuple(value.shape)}, expected {want}.")
    missing = set(all_sites(model)) - set(run.cache)
    if missing:
        raise ModelCheckError(f"{model.name}: sites never fired: {sorted(missing)[:5]}.")
    err = (run.logits.float() - plain).abs().max().item()
    if err > 1e-3 * max(1.0, plain.abs().max().item()):
        raise ModelCheckError(
            f"{model.name}: explicitly computed attention changes the logits by {err:.2e}; "
            "the attention mask or the adapter's attention path is wrong."
        )
    dec = decompose_cache(model, run.batch, run.cache)
    total = dec.vectors.sum(dim=1)
    rel = ((total - dec.resid).norm() / dec.resid.norm()).item()
    if rel > DECOMPOSITION_RTOL:
        raise ModelCheckError(
            f"{model.name}: the component writes add up to the final residual only within {rel:.2e} "
            f"(relative), above {DECOMPOSITION_RTOL}; the adapter misses a write."
        )
    final = model.final_norm
    with torch.no_grad():
        native = final(dec.resid.to(model.device).to(final.weight.dtype)).float().cpu()
    frozen = apply_frozen_norm(dec.resid, dec.scale, final, model.spec.norm).cpu()
    bias = norm_bias(final)
    if bias is not None:
        frozen = frozen + bias.cpu()
    if (native - frozen).abs().max().item() > 1e-3 * max(1.0, native.abs().max().item()):
        raise ModelCheckError(f"{model.name}: the final norm does not match its frozen-scale form.")
    own = plain.cpu()[torch.arange(b), dec.positions]
    err = (model.unembed(dec.resid) - own).abs().max().item()
    if err > 1e-3 * max(1.0, own.abs().max().item()):
        raise ModelCheckError(
            f"{model.name}: the final norm, unembedding and soft-cap ({model.logit_softcap}) of the final residual "
            f"miss the model's logits by {err:.2e}; the adapter names the wrong modules or soft-cap field."
        )
