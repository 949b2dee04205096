"""Direct logit attribution (DLA): how much each component's write moves a logit directly.

The final residual at a position is a sum of component writes (see
:mod:`lmscope.models.decompose`). With the final norm's scale ``1/s`` frozen at its value in the
run, the logit of token t is linear in those writes:
``logit_t = Σ_c (norm_frozen(c) · W_U[:, t]) + β·W_U[:, t] + b_U[t]``,
so each component gets ``norm_frozen(c) · W_U[:, t]`` and the last two terms form a constant
bucket. For a logit difference use ``W_U[:, t] − W_U[:, foil]``. LayerNorm models centre each
component (equivalently, the direction); RMSNorm models do not. The components' attributions
plus the constant equal the model's own logit (difference) exactly (the pre-soft-cap logit where the
model soft-caps its logits, below).

Soft-capped models (Gemma 2: logits = c·tanh(z / c) of the unembedding's output z) are not linear
in the writes after the cap, so DLA decomposes the pre-soft-cap logit z exactly and says so:
``meta["metric"]`` is then "pre-soft-cap logit (difference)", ``meta["metric_value"]`` the model's
own value of it, and ``meta["model_value"]`` the logit (difference) the model outputs, after the
cap. The cap is monotonic, so a single logit keeps its sign and ranking; magnitudes shrink.
Without a soft-cap both values are the model's logit (difference).

Granularity: ``by="layer"`` (embedding, each attention block, each MLP; each block of a state-space
model such as Mamba; each time mix and channel mix of RWKV), ``by="head"`` (layer ×
head, with the MLPs, embedding and biases in ``extras``), ``by="neuron"`` (layer × neuron, with the
heads and the rest in ``extras``; needs a model with MLPs). An attention-only model has no MLP
entries. Reference: nostalgebraist (2020); Elhage et al. (2021); the
Primer §3.2.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from lmscope import specs
import torch

from lmscope.errors import InputError
from lmscope.models import Model, decompose_cache, readout_values
from lmscope.sites import resolve_position, site_names
from lmscope.results import Axis, Result

BY = ("layer", "head", "neuron")


def dla(model: Model, prompt: str, target: str | int, foil: str | int | None = None, *,
        by: str = "layer", position: int | None = None) -> Result:
    """Direct logit attribution of ``target`` (or ``target − foil``) at ``position`` (default last)."""
    if by not in BY:
        raise InputError(f"by={by!r}: use one of {BY}.")
    neurons = by == "neuron"
    if neurons:
        model.require(["mlp.post"], "DLA by neuron")
    if by == "head":
        model.require(["attn.head_out"], "DLA by head")
    has_mlp = "mlp" in model.parts  # an attention-only model has no MLP components
    n = model.spec.n_layers
    # a state-space block writes once; RWKV's time mix once, then its channel mix (the MLP part)
    writes = "attn.head_out" if "attention" in model.parts else model.mixer_write_kind
    sites = ["embed", "final.scale", f"blocks.{n - 1}.resid_post", *site_names(writes, n),
             *(site_names("mlp.post" if neurons else "mlp_out", n) if has_mlp else [])]
    run = model.run(prompt, cache=sites, logits="all")
    pos = resolve_position(position, run.batch.input_ids.shape[1])
    direction = model.logit_direction(target, foil, scale=run["final.scale"][0, pos])
    v, const = direction.vector, direction.constant  # (D,): a component c contributes c · v
    info = {"target": model.decode([direction.target_id]), "target_id": direction.target_id}
    if direction.foil_id is not None:
        info.update(foil=model.decode([direction.foil_id]), foil_id=direction.foil_id)
    meta = {"constant": const, "position": pos, "tokens": run.batch.str_tokens[0],
            **readout_values(model, run.logits[0, pos], run[f"blocks.{n - 1}.resid_post"][0, pos],
                             info["target_id"], info.get("foil_id"))}
    target_doc = {**info, "position": pos}
    params = {"by": by, "position": position}
    layers = Axis("layer", tuple(str(i) for i in range(n)))

    if by == "layer":
        dec = decompose_cache(model, run.batch, run.cache, pos)
        contrib = dec.vectors[0].cpu() @ v
        labels, values = ["embed"], [contrib[0]]
        for layer in range(n):
            idx = [i for i, (k, ly) in enumerate(zip(dec.kinds, dec.layers)) if ly == layer]
            if "ssm" in model.parts:  # a state-space block writes once
                labels.append(f"L{layer}.ssm")
                values.append(sum(contrib[i] for i in idx))
                continue
            attn = sum(contrib[i] for i in idx if dec.kinds[i] in ("head", "attn_bias", "wkv"))
            labels.append(f"L{layer}.wkv" if "wkv" in model.parts else f"L{layer}.attn")
            values.append(attn)
            if has_mlp:
                labels.append(f"L{layer}.mlp")
                values.append(sum(contrib[i] for i in idx if dec.kinds[i] == "mlp"))
        meta["total"] = float(torch.stack(values).sum() + const)
        return Result(torch.stack(values), (Axis("component", tuple(labels)),), "dla", model.name,
                      target_doc, params, meta=meta)

    # the mixers' writes beside the neurons: per head, or (RWKV) each time mix's write, in extras["heads"]
    heads = torch.stack([run[f"blocks.{l}.{writes}"][0, pos].float().cpu() @ v for l in range(n)])
    embed = run["embed"][0, pos].float().cpu() @ v
    attn_bias = torch.tensor([_bias_term(model.b_O(l), run, f"aux.blocks.{l}.attn_write_factor", pos, v)
                              if "attention" in model.parts else 0.0 for l in range(n)])
    extras = {"embed": embed.reshape(1), "attn_bias": attn_bias}
    if by == "head":
        mlp = torch.stack([run[f"blocks.{l}.mlp_out"][0, pos].float().cpu() @ v for l in range(n)]) if has_mlp \
            else torch.zeros(0)
        if has_mlp:
            extras["mlp"] = mlp
        meta["total"] = float(heads.sum() + mlp.sum() + embed + attn_bias.sum() + const)
        return Result(heads, (layers, Axis("head", tuple(str(h) for h in range(model.spec.n_heads)))),
                      "dla", model.name, target_doc, params, extras, meta)

    neuron_vals, mlp_bias = [], []
    for layer in range(n):
        w = v
        key = f"aux.blocks.{layer}.mlp_write_factor"
        if key in run.cache:
            w = v * run.cache[key][0, pos].float().cpu()
        per_neuron = model.W_out(layer).detach().float().cpu() @ w  # (F,)
        neuron_vals.append(run[f"blocks.{layer}.mlp.post"][0, pos].float().cpu() * per_neuron)
        mlp_bias.append(_bias_term(model.b_out(layer), run, key, pos, v))
    values = torch.stack(neuron_vals)
    extras.update(heads=heads, mlp_bias=torch.tensor(mlp_bias))
    meta["total"] = float(values.sum() + heads.sum() + embed + attn_bias.sum() + sum(mlp_bias) + const)
    return Result(values, (layers, Axis("neuron", tuple(str(i) for i in range(model.spec.d_mlp)))),
                  "dla", model.name, target_doc, params, extras, meta)


def _bias_term(bias, run, factor_key: str, pos: int, v: torch.Tensor) -> float:
    if bias is None:
        return 0.0
    b = bias.detach().float().cpu()
    if factor_key in run.cache:
        b = b * run.cache[factor_key][0, pos].float().cpu()
    return float(b @ v)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class DLAConfig:
    """Direct logit attribution by layer, head or neuron (final-norm scale frozen)."""

    by: str = specs.option("layer", "layer | head | neuron", choices=BY)
    position: int | None = specs.option(None, "Token position (default: last).")

    def __post_init__(self):
        specs.check_config(self)


def run_dla(model: Model, prompt: specs.Prompt, config: DLAConfig) -> Result:
    """Direct logit attribution by layer, head or neuron (final-norm scale frozen)."""
    return dla(model, prompt.text, prompt.target, prompt.foil, by=config.by, position=config.position)


specs.register(specs.MethodSpec("dla", "localization", "prompt", DLAConfig, run_dla,
                                sites=("embed", "final.scale")))  # per granularity: dla() asks
