"""Context mixing: how much each token's representation draws on each earlier token.

Every map is a T × T matrix per layer with row i the receiving position and column j the source
(rows ≥ 0; causal, so zero above the diagonal). Layers are aggregated by rollout with the later
layer on the left: ``R¹ = C¹``, ``Rˡ = Cˡ Rˡ⁻¹``.

* :func:`raw_attention` — attention probabilities per head (L, H, T, T), head mean in ``extras``.
* :func:`attention_rollout` — Abnar & Zuidema (2020): ``Ã = 0.5·Ā + 0.5·I`` (Ā the head mean, rows
  renormalised), ``R = Ã^L ⋯ Ã¹``.
* :func:`attention_norm` — Kobayashi et al. (2020): ``‖α^h_ij f_h(x_j)‖₂`` with
  ``f_h(x_j) = v^h_j W_O^h`` (the value vector, bias included, times the head's output projection),
  per head and ``‖Σ_h α^h_ij f_h(x_j)‖₂`` per layer.
* :func:`alti` — Ferrando et al. (2022): the attention block's output ``y_i = x_i + attn_out_i`` is
  split into ``T_i(x_j) = Σ_h α^h_ij f_h(x_j) + 1[i=j]·x_i`` plus a bias; contributions
  ``c_ij = max(0, ‖y_i‖₁ − ‖y_i − T_i(x_j)‖₁)``, rows normalised, then rolled out.
* :func:`alti_logit` — Ferrando et al. (2023): each layer's per-source write into the target
  position, projected on the (target − foil) unembedding through the final norm with its scale
  frozen, tracked back to the input tokens with the ALTI rollout of the layers below.
* :func:`value_zeroing` — Mohebbi et al. (2023): zero token j's value vector in every head of layer
  l, recompute the whole layer (attention, residual, norms, MLP), score ``1 − cos(y_i, ỹ_i)``; rows
  normalised and rolled out (no extra identity: the layer output already holds the residual).

Exact and approximated. GQA: key/value heads are expanded to the query heads before any per-head
split, so per-head terms are exact. Pre-norm models (Llama, Qwen, Mistral, GPT-2, NeoX; RMSNorm or
LayerNorm): the input norm acts on each source token separately, so ``T_i(x_j)`` is an exact,
additive split of the attention block's output (the sum over j plus ``b_O`` reconstructs it; the
reconstruction error is in ``meta``). Post-norm models (Gemma 2/3 norm the attention write
before adding it): the post-norm's scale is frozen at its value in the run, so the split still sums
exactly to the real output, but how one source's term would change if other sources changed is
approximated. ALTI-Logit freezes the final norm's scale the same way (LayerNorm models also centre).
Parallel blocks (NeoX with ``use_parallel_residual``): ALTI decomposes ``x_i + attn_out_i``, the
attention half of the block; the MLP, which reads ``x_i`` only, mixes nothing.
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError, UnsupportedArchitectureError
from lmscope.interventions import Ablate, Scale
from lmscope.models import Batch, Model, block_outputs, readout_values
from lmscope.results import Axis, Result
from lmscope.sites import site_names
from lmscope.attribution.targets import resolve_position, resolve_target, token_result


def _batch(model: Model, prompt) -> Batch:
    batch = model.encode(prompt)
    if batch.input_ids.shape[0] != 1:
        raise InputError("Context mixing explains one prompt at a time; pass a single string.")
    return batch


def _axes(batch: Batch) -> tuple[Axis, Axis]:
    tokens = tuple(batch.str_tokens[0])
    return Axis("query", tokens), Axis("key", tokens)


def rollout(per_layer: torch.Tensor) -> torch.Tensor:
    """(L, T, T) -> (T, T): ``C^L ⋯ C^1`` (the later layer multiplies on the left)."""
    r = per_layer[0]
    for c in per_layer[1:]:
        r = c @ r
    return r


def _normalise_rows(c: torch.Tensor) -> torch.Tensor:
    return c / c.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def _patterns(model: Model, batch: Batch) -> torch.Tensor:
    run = model.run(batch, cache=site_names("attn.pattern", model.spec.n_layers), logits="none")
    return torch.stack([run[f"blocks.{l}.attn.pattern"][0].float().cpu() for l in range(model.spec.n_layers)])


def raw_attention(model: Model, prompt) -> Result:
    """Attention probabilities (layer, head, query, key); ``extras["mean"]`` the head mean (L, T, T)."""
    batch = _batch(model, prompt)
    a = _patterns(model, batch)
    s = model.spec
    axes = (Axis("layer", tuple(range(s.n_layers))), Axis("head", tuple(range(s.n_heads))), *_axes(batch))
    return Result(a, axes, "attention", model.name, None, {}, {"mean": a.mean(dim=1)},
                  {"tokens": batch.str_tokens[0]})


def attention_rollout(model: Model, prompt) -> Result:
    """Rollout (query, key) of head-mean attention with the residual identity; ``extras["per_layer"]``."""
    batch = _batch(model, prompt)
    a = _patterns(model, batch).mean(dim=1)
    eye = torch.eye(a.shape[-1])
    a_res = _normalise_rows(0.5 * a + 0.5 * eye)
    return Result(rollout(a_res), _axes(batch), "rollout", model.name, None, {"residual": 0.5},
                  {"per_layer": a_res}, {"tokens": batch.str_tokens[0]})


# ---------------------------------------------------------------------------------- decomposed blocks
def _mixing_run(model: Model, batch: Batch, extra: tuple[str, ...] = ()):
    n = model.spec.n_layers
    sites = [*site_names("attn.pattern", n), *site_names("attn.v", n), *site_names("resid_pre", n),
             *site_names("attn_out", n), *site_names("attn.head_out", n), *extra]
    return model.run(batch, cache=sites, logits="all" if extra else "none")


def layer_terms(model: Model, run, layer: int) -> dict[str, torch.Tensor]:
    """Per-layer pieces: ``heads`` (H, Tq, Tk, D) = α^h_ij f_h(x_j) (times a frozen post-norm factor),
    ``x`` (T, D) the block input, ``y`` (T, D) = x + attn_out, ``bias`` (T, D) the rest of y."""
    a = run[f"blocks.{layer}.attn.pattern"][0].float().cpu()  # (H, T, T)
    v = run[f"blocks.{layer}.attn.v"][0].float().cpu()  # (T, H, dh), KV heads expanded
    f = torch.einsum("thd,hde->hte", v, model.W_O(layer).detach().float().cpu())  # (H, T, D)
    heads = a[..., None] * f[:, None, :, :]  # (H, Tq, Tk, D)
    factor_key = f"aux.blocks.{layer}.attn_write_factor"
    if factor_key in run.cache:
        heads = heads * run.cache[factor_key][0].float().cpu()[None, :, None, :]
    x = run[f"blocks.{layer}.resid_pre"][0].float().cpu()
    y = x + run[f"blocks.{layer}.attn_out"][0].float().cpu()
    bias = y - x - heads.sum(dim=(0, 2))
    return {"heads": heads, "x": x, "y": y, "bias": bias, "pattern": a}


def _bias_expected(model: Model, run, layer: int, t: int) -> torch.Tensor:
    b = model.b_O(layer)
    if b is None:
        return torch.zeros(t, model.spec.d_model)
    b = b.detach().float().cpu().expand(t, -1)
    key = f"aux.blocks.{layer}.attn_write_factor"
    return b * run.cache[key][0].float().cpu() if key in run.cache else b.clone()


def attention_norm(model: Model, prompt) -> Result:
    """Layer-level ``‖Σ_h α^h_ij f_h(x_j)‖₂`` (layer, query, key); per head in ``extras["per_head"]``."""
    batch = _batch(model, prompt)
    run = _mixing_run(model, batch)
    per_layer, per_head = [], []
    for layer in range(model.spec.n_layers):
        heads = layer_terms(model, run, layer)["heads"]
        per_head.append(heads.norm(dim=-1))
        per_layer.append(heads.sum(dim=0).norm(dim=-1))
    axes = (Axis("layer", tuple(range(model.spec.n_layers))), *_axes(batch))
    return Result(torch.stack(per_layer), axes, "attention_norm", model.name, None, {},
                  {"per_head": torch.stack(per_head)}, {"tokens": batch.str_tokens[0]})


def alti_contributions(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, T) row-normalised ALTI contributions of one layer from :func:`layer_terms`."""
    y = terms["y"]
    t = y.shape[0]
    tij = terms["heads"].sum(dim=0)  # (Tq, Tk, D)
    tij = tij.clone()
    idx = torch.arange(t)
    tij[idx, idx] += terms["x"]
    c = (y.abs().sum(dim=-1)[:, None] - (y[:, None, :] - tij).abs().sum(dim=-1)).clamp(min=0)
    c = torch.tril(c)
    return _normalise_rows(c)


def alti(model: Model, prompt) -> Result:
    """ALTI rolled out over layers (query, key); ``extras["per_layer"]`` (L, T, T)."""
    batch = _batch(model, prompt)
    run = _mixing_run(model, batch)
    t = batch.input_ids.shape[1]
    per_layer, err = [], 0.0
    for layer in range(model.spec.n_layers):
        terms = layer_terms(model, run, layer)
        err = max(err, float((terms["bias"] - _bias_expected(model, run, layer, t)).abs().max()))
        per_layer.append(alti_contributions(terms))
    c = torch.stack(per_layer)
    return Result(rollout(c), _axes(batch), "alti", model.name, None, {"distance": "L1"},
                  {"per_layer": c}, {"tokens": batch.str_tokens[0], "max_reconstruction_error": err})


def alti_logit(model: Model, prompt, target, foil=None, *, position: int | None = None) -> Result:
    """ALTI-Logit per input token (signed logit (difference) units); ``extras["per_layer"]`` (L, T).

    ``meta`` holds the terms that do not pass through attention (the target position's own
    embedding, the MLP writes at that position, the biases and the final-norm/unembedding constant):
    the token scores plus those add up to the model's own logit (difference), in ``meta["metric_value"]``;
    on a soft-capped model (Gemma 2) that is the pre-soft-cap logit (``meta["metric"]`` says so) and
    ``meta["model_value"]`` holds the logit (difference) the model outputs.
    """
    batch = _batch(model, prompt)
    t = batch.input_ids.shape[1]
    pos = resolve_position(position, t)
    tgt = resolve_target(model, target, foil, "logit", pos)
    n = model.spec.n_layers
    has_mlp = "mlp" in model.parts  # an attention-only model has no MLP term
    run = _mixing_run(model, batch, ("embed", "final.scale", f"blocks.{n - 1}.resid_post",
                                     *(site_names("mlp_out", n) if has_mlp else ())))
    direction = model.logit_direction(tgt.target_id, tgt.foil_id, scale=run["final.scale"][0, pos].reshape(()))
    v, const = direction.vector, direction.constant  # logit (difference) = resid · v + const, scale frozen
    r_prev = torch.eye(t)
    per_layer, bias_term, mlp_term = [], 0.0, 0.0
    for layer in range(n):
        terms = layer_terms(model, run, layer)
        delta = terms["heads"][:, pos].sum(dim=0) @ v  # (T,) per source j
        per_layer.append(delta @ r_prev)
        bias_term += float(terms["bias"][pos] @ v)
        if has_mlp:
            mlp_term += float(run[f"blocks.{layer}.mlp_out"][0, pos].float().cpu() @ v)
        r_prev = alti_contributions(terms) @ r_prev
    per_layer = torch.stack(per_layer)
    readout = readout_values(model, run.logits[0, pos], run[f"blocks.{n - 1}.resid_post"][0, pos],
                             tgt.target_id, tgt.foil_id)
    meta = {"embed_term": float(run["embed"][0, pos].float().cpu() @ v), "mlp_term": mlp_term,
            "bias_term": bias_term, "constant": const, "position": pos, **readout}
    return token_result(model, batch.str_tokens[0], per_layer.sum(dim=0), "alti_logit", tgt,
                        {"metric": "logit"}, {"per_layer": per_layer}, meta)


def value_zeroing(model: Model, prompt, *, chunk_size: int | None = None) -> Result:
    """Value zeroing rolled out over layers (query, key); ``extras["per_layer"]`` (L, T, T) row-normalised,
    ``extras["raw"]`` (L, T, T) the cosine distances before normalising."""
    batch = _batch(model, prompt)
    t, n = batch.input_ids.shape[1], model.spec.n_layers
    probe = model.run(batch, cache=["blocks.0.attn.v"], logits="none")
    if "blocks.0.attn.v" not in probe.cache:
        raise UnsupportedArchitectureError(
            f"Value zeroing needs to rewrite {model.name}'s value vectors, but its attention does not run "
            "through lmscope's attention function. Use alti or attention_norm, or add the attention "
            "module to the model's adapter.")
    raw = torch.zeros(n, t, t)
    for layer in range(n):
        site = f"blocks.{layer}.attn.v"
        sets = [[Scale(site, 1.0)]] + [[Ablate(site, positions=[j])] for j in range(t)]
        out = block_outputs(model, batch, layer, sets, chunk_size=chunk_size)[:, 0].float().cpu()  # (1+T, T, D)
        y, zeroed = out[0], out[1:]  # zeroed[j, i]
        dist = 1 - torch.nn.functional.cosine_similarity(y[None], zeroed, dim=-1)  # (j, i)
        raw[layer] = torch.tril(dist.T.clamp(min=0))
    per_layer = _normalise_rows(raw)
    return Result(rollout(per_layer), _axes(batch), "value_zeroing", model.name, None, {"distance": "cosine"},
                  {"per_layer": per_layer, "raw": raw}, {"tokens": batch.str_tokens[0]})


def token_scores(result: Result, position: int | None = None) -> Result:
    """A (T,) view over source tokens of a context-mixing result at query ``position`` (default last):
    the aggregated row for rollout/ALTI/value zeroing, the last layer's row for raw attention (head
    mean) and attention-norm."""
    tokens = result.meta["tokens"]
    pos = resolve_position(position, len(tokens))
    if result.method == "attention":
        row = result.extras["mean"][-1, pos]
    elif result.method == "attention_norm":
        row = result.values[-1, pos]
    elif result.values.ndim == 2:
        row = result.values[pos]
    else:
        return result
    return Result(row, (Axis("token", tuple(tokens)),), result.method, result.model, result.target,
                  {**result.params, "query_position": pos}, {"matrix": result.values}, result.meta)
