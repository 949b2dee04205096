"""Read-outs: the residual stream and component writes in vocabulary space, written once.

Method families ask :class:`~lmscope.models.Model` for these (``model.unembed``,
``model.logit_direction``, ``model.norm``, ...); the functions here hold the one implementation.

* **Unembedding** of final-residual vectors x (..., D): with the final norm live (its scale computed
  from x, bias included), the unembedding and the soft-cap, this is the model's own read-out. With
  the norm's scale frozen at a given 1/s it is linear in x: ``norm_frozen(x) W_U`` with
  ``norm_frozen(x) = centre(x) · (1/s) · g`` (``centre`` only for LayerNorm, ``g`` the gain, no bias and
  no ``b_U``): the direct logit contribution of a write x. A linear read-out gives pre-soft-cap logits.
* **Logit direction** of a target (minus a foil): ``logit_t [− logit_f] = x · v + constant`` under a
  frozen final-norm scale, with ``v = centre(1/s · g ⊙ (W_U[:, t] − W_U[:, f]))`` and the constant
  ``β · u + b_U[t] − b_U[f]`` (β the final norm's bias).
* **Norms by name** (TransformerLens names): ``ln_final`` and, per block ``l``, ``blocks.{l}.ln1``
  and ``blocks.{l}.ln2`` (the attention and MLP input norms), ``blocks.{l}.ln1_post`` and
  ``blocks.{l}.ln2_post`` (the post-norms of the attention and MLP writes, on models that have
  them), live or with the scale frozen.

Shapes: D residual width, V vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from lmscope.errors import InputError, SiteError
from lmscope.models.norms import apply_frozen_norm, norm_bias, norm_gain
from lmscope.models.parts import get_module

if TYPE_CHECKING:
    from lmscope.models.model import Model

NORM_KINDS = ("ln1", "ln2", "ln1_post", "ln2_post")
_NORM_NAME = re.compile(r"blocks\.(-?\d+)\.(ln1|ln2|ln1_post|ln2_post)")


@dataclass(frozen=True)
class LogitDirection:
    """``logit(target) [− logit(foil)] = x · vector + constant`` for a final residual x, under the final
    norm's scale frozen at the ``scale`` it was built with (pre-soft-cap logits on soft-capped models).

    ``unembed`` (D,) is ``W_U[:, t] − W_U[:, f]``; ``vector`` (..., D) folds in the frozen norm (one row
    per scale given); ``constant`` is the final-norm bias and unembedding bias along the direction.
    """

    target_id: int
    foil_id: int | None
    unembed: torch.Tensor
    vector: torch.Tensor
    constant: float


def parse_norm(name: str, n_layers: int) -> tuple[str, int | None]:
    """``"ln_final"`` -> ("ln_final", None); ``"blocks.3.ln1"`` -> ("ln1", 3); an error naming the forms."""
    if name in ("ln_final", "final"):
        return "ln_final", None
    m = _NORM_NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise SiteError(f"{name!r} names no norm: use 'ln_final' or 'blocks.{{l}}.{{kind}}' with kind one of "
                        f"{NORM_KINDS}.")
    layer = int(m.group(1))
    if not -n_layers <= layer < n_layers:
        raise SiteError(f"Norm {name!r}: layer {layer} is out of range (the model has {n_layers} layers).")
    return m.group(2), layer % n_layers


def norm_module(model: Model, name: str):
    """The native norm module named ``name`` (see :func:`parse_norm`); an error if the model has none."""
    kind, layer = parse_norm(name, model.spec.n_layers)
    if kind == "ln_final":
        return get_module(model.hf, model.adapter.final.norm)
    norms = model.adapter.block.norms
    path = {"ln1": norms.pre_mixer, "ln2": norms.pre_mlp, "ln1_post": norms.post_mixer,
            "ln2_post": norms.post_mlp}[kind]
    if path is None:
        what = "post-norms (Gemma 2/3)" if kind.endswith("_post") else "an MLP"
        raise SiteError(f"{model.name} has no {kind} norm: only models with {what} have one.")
    return get_module(model.block(layer), path)


def _unembed_module(model: Model):
    return get_module(model.hf, model.adapter.final.unembed)


def frozen_norm(model: Model, module, x: torch.Tensor, scale) -> torch.Tensor:
    """``module`` (a norm of ``model``) applied to x (..., D) with its scale frozen at ``scale`` (1/s, a
    scalar or (..., 1)): centred for LayerNorm, times 1/s and the gain, no bias. Linear in x; float32,
    on the model's device."""
    x = x.to(model.device)
    return apply_frozen_norm(x, torch.as_tensor(scale).to(device=x.device, dtype=torch.float32), module,
                             model.spec.norm)


def norm(model: Model, name: str, x: torch.Tensor, scale=None) -> torch.Tensor:
    """The norm ``name`` applied to x (..., D): live (the module itself) or, with ``scale``, frozen (see
    :func:`frozen_norm`). float32 on the model's device, no gradient to the model."""
    module = norm_module(model, name)
    if scale is not None:
        return frozen_norm(model, module, x.detach(), scale)
    with torch.no_grad():
        return module(x.to(model.device, module.weight.dtype)).float()


def unembed(model: Model, resid: torch.Tensor, scale=None, softcap: bool | None = None,
            grad: bool = False) -> torch.Tensor:
    """Logits (..., V) of final residual vectors (..., D); see the module docstring.

    ``scale=None``: the live final norm, the unembedding and (unless ``softcap=False``) the soft-cap.
    ``scale`` given (1/s, a scalar or (..., 1)): the linear read-out with the norm's scale frozen
    (no biases, no soft-cap; ``softcap=True`` is an error). float32 on the CPU; with ``grad=True``
    differentiable in ``resid`` (the model's parameters detached) and left on the model's device.
    """
    final, head = norm_module(model, "ln_final"), _unembed_module(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if scale is not None:
            if softcap:
                raise InputError("A read-out with the final norm's scale frozen is linear and gives pre-soft-cap "
                                 "logits; leave softcap out, or pass scale=None for the model's own read-out.")
            x = frozen_norm(model, final, resid, scale)
            logits = x @ model.W_U.detach().float()
            return logits if grad else logits.cpu()
        if grad:
            x = functional_call(final, {k: v.detach() for k, v in final.named_parameters()},
                                (resid.to(next(final.parameters()).dtype),))
            logits = functional_call(head, {k: v.detach() for k, v in head.named_parameters()}, (x,)).float()
        else:
            x = resid.to(model.device).to(final.weight.dtype)
            logits = head(final(x)).float()
        logits = model.softcap(logits) if softcap is not False else logits
    return logits if grad else logits.cpu()


def logit_direction(model: Model, target: str | int, foil: str | int | None = None, scale=1.0) -> LogitDirection:
    """The :class:`LogitDirection` of ``target`` (minus ``foil``) under the final norm's scale frozen at
    ``scale`` (1/s: a scalar, or (..., 1) for one vector per row)."""
    t = model.token_id(target)
    f = None if foil is None else model.token_id(foil)
    if f == t:
        raise InputError(f"The foil {foil!r} is the target itself; choose a different token to contrast "
                         "with, or leave the foil out for a non-contrastive target.")
    w_u = model.W_U.detach().float().cpu()
    u = w_u[:, t] - (w_u[:, f] if f is not None else 0.0)
    final = norm_module(model, "ln_final")
    v = torch.as_tensor(scale).float().cpu() * norm_gain(final, model.spec.norm).detach().cpu() * u
    if model.spec.norm == "layer":
        v = v - v.mean(dim=-1, keepdim=True)
    const = 0.0
    beta = norm_bias(final)
    if beta is not None:
        const += float(beta.detach().cpu() @ u)
    if model.b_U is not None:
        const += float(model.b_U[t])
        if f is not None:
            const -= float(model.b_U[f])
    return LogitDirection(t, f, u, v, const)
