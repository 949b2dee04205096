"""Logit lens (nostalgebraist, 2020): decode the residual stream after every layer, at every position.

The residual before block 0 ("embed") and after each block is passed through the model's own
final norm and unembedding, as if the model stopped there. The result covers the whole
layer × position grid: per cell the probability of the target token (or, without a target, of the
cell's top-1 token), with the top-k tokens and probabilities of every cell in ``extras``/``meta``.
The final row equals the model's own prediction. :func:`lens_top` is the one-position view (top-k
tokens per layer, the target's rank and probability) that the command line prints.

Shapes: values (layers + 1, T); extras ``top_probs``/``top_ids`` (layers + 1, T, k),
``target_rank`` (layers + 1, T) with a target; meta ``top_tokens`` [layers + 1][T][k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_position, site_names


def residual_logits(model: Model, resid: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors (..., D) through the final norm, unembedding and any soft-cap."""
    return model.unembed(resid)


def lens_grid(model: Model, hidden_LTD: torch.Tensor, decode, tokens: list[str], target, k: int, method: str,
              params: dict) -> Result:
    """The layer × position Result of a lens: ``decode(h (T, D)) -> logits (T, V)`` applied layer by layer."""
    n_rows, t = hidden_LTD.shape[:2]
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: give a positive number of top tokens.")
    tid = None if target is None else model.token_id(target)
    top_p, top_i, tgt_p, tgt_r = [], [], [], []
    for row in range(n_rows):
        probs = decode(hidden_LTD[row]).softmax(dim=-1)  # (T, V)
        top = probs.topk(k, dim=-1)
        top_p.append(top.values)
        top_i.append(top.indices)
        if tid is not None:
            tgt_p.append(probs[:, tid])
            tgt_r.append((probs > probs[:, tid:tid + 1]).sum(dim=-1) + 1)
    top_probs, top_ids = torch.stack(top_p), torch.stack(top_i)
    extras = {"top_probs": top_probs, "top_ids": top_ids}
    target_doc = None
    if tid is not None:
        values = torch.stack(tgt_p)
        extras["target_rank"] = torch.stack(tgt_r)
        target_doc = {"target": model.decode([tid]), "target_id": tid}
    else:
        values = top_probs[..., 0]
    meta = {"tokens": tokens, "value": "target probability" if tid is not None else "top-1 probability",
            "top_tokens": [[[model.decode([i]) for i in cell] for cell in row] for row in top_ids.tolist()]}
    layers = ("embed", *(str(l) for l in range(n_rows - 1)))
    axes = (Axis("layer", layers), Axis("position", tuple(f"{i}:{tok}" for i, tok in enumerate(tokens))))
    return Result(values, axes, method, model.name, target_doc, {"k": k, **params}, extras, meta)


def logit_lens(model: Model, prompt: str, target: str | int | None = None, *, k: int = 5,
               position: int | None = None) -> Result:
    """The logit lens over every layer and position (see the module docstring); ``position`` is the
    default position of :func:`lens_top` (last token when None)."""
    n = model.spec.n_layers
    k = resolve_count(k, model.spec.d_vocab, "top tokens per layer")
    run = model.run(prompt, cache=["blocks.0.resid_pre", *site_names("resid_post", n)], logits="none")
    resolve_position(position, run.batch.input_ids.shape[1])  # checked now, used by lens_top
    resid = torch.stack([run["blocks.0.resid_pre"][0]] + [run[f"blocks.{l}.resid_post"][0] for l in range(n)])
    return lens_grid(model, resid, lambda h: residual_logits(model, h), run.batch.str_tokens[0], target, k,
                     "logit_lens", {"position": position})


def lens_top(result: Result, position: int | None = None) -> Result:
    """The one-position view of a lens grid: values (layers + 1, k) top-k probabilities, meta ``top_tokens``
    per layer, extras ``target_prob``/``target_rank`` (layers + 1,) with a target."""
    t = result.shape[1]
    position = result.params.get("position") if position is None else position
    pos = resolve_position(position, t)
    k = result.extras["top_probs"].shape[-1]
    extras = {}
    if result.target is not None:
        extras = {"target_prob": result.values[:, pos], "target_rank": result.extras["target_rank"][:, pos]}
    target = None if result.target is None else {**result.target, "position": pos}
    meta = {"top_tokens": [row[pos] for row in result.meta["top_tokens"]], "position": pos,
            "tokens": result.meta["tokens"]}
    return Result(result.extras["top_probs"][:, pos], (result.axes[0], Axis("rank", tuple(str(r + 1) for r in range(k)))),
                  result.method, result.model, target, {**result.params, "position": position}, extras, meta)


@dataclass(frozen=True)
class LensConfig:
    """Logit or tuned lens of one prompt over every layer and position."""

    k: int = specs.option(5, "Top tokens kept per cell (and shown per layer).")
    position: int | None = specs.option(None, "Token position the command line shows (default: last).")
    kind: str = specs.option("logit", "logit | tuned", choices=("logit", "tuned"))
    lens_path: str | None = specs.option(None, "Folder of a trained tuned lens (for --kind tuned).", flags=("--lens",))

    def __post_init__(self):
        specs.check_config(self)
        if self.kind == "tuned" and self.lens_path is None:
            raise InputError("--kind tuned needs --lens DIR (train one with `lmscope lens train --out DIR`).")
        if self.k < 1:
            raise InputError(f"k={self.k}: give a positive number of top tokens.")


def run_lens(model: Model, prompt: specs.Prompt, config: LensConfig) -> Result:
    """Logit or tuned lens: decode the residual stream after every layer, at every position."""
    if config.kind == "logit":
        return logit_lens(model, prompt.text, prompt.target, k=config.k, position=config.position)
    from lmscope.decoding.tuned_lens import TunedLens, tuned_lens

    return tuned_lens(model, prompt.text, TunedLens.load(config.lens_path, model), prompt.target, k=config.k,
                      position=config.position)


specs.register(specs.MethodSpec("lens", "decoding", "prompt", LensConfig, run_lens, sites=("resid_post",),
                                 cli_inputs=("text", "target")))
