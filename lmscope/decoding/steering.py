"""Linear directions and steering: difference of means, CAA, ActAdd; projection and erasure.

A concept that the model represents linearly has a direction in the residual stream. This module
estimates such directions and uses them:

* :func:`mean_difference` / :func:`direction_from_texts`: mean activation of positive texts minus
  that of negative texts at one site and layer (the labelled-set version takes labels 1 vs 0);
* :func:`caa_vector` (Rimsky/Panickssery et al. 2024, contrastive activation addition): the mean over
  prompt pairs of h(positive) − h(negative), read at one token (by default the last; CAA reads the
  answer letter at −2);
* :func:`actadd_vector` (Turner et al. 2023, activation addition): h(p₊) − h(p₋) at every position of
  a prompt pair padded to equal length, a (P, D) vector added front-aligned at positions 0..P-1;
* :func:`generate`: greedy generation with a vector ``scale·v`` added at chosen layers and positions
  on every forward (with a KV cache, so positions are absolute: the prompt's tokens are 0..T-1 and
  generated tokens continue from T; see ``positions`` and ``from_position``);
* :func:`project` and :func:`erase`, and the :class:`Erase` intervention that removes a direction
  from a site during a forward (linear erasure of one direction).

Shapes: directions (D,) at a residual-width site, or (P, D) for ActAdd; generations return token ids
(B, n) and log-probabilities (B, n, V).
"""

from __future__ import annotations

from lmscope import specs
from lmscope.results import Axis, Result
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.decoding.probes import Position, collect, resolve_layers
from lmscope.errors import InputError
from lmscope.interventions import Add, Erase  # noqa: F401  (Erase is re-exported here)
from lmscope.models import Model, StepInterventions


# ----------------------------------------------------------------------------------- directions
def mean_difference(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """mean(pos) − mean(neg) for activations (N, D) and (M, D)."""
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1] or not len(pos) or not len(neg):
        raise InputError(f"mean_difference needs two non-empty (N, D) tensors of equal D; got {tuple(pos.shape)} "
                         f"and {tuple(neg.shape)}.")
    return pos.float().mean(0) - neg.float().mean(0)


def direction_from_texts(model: Model, positive: Sequence[str], negative: Sequence[str], layer: int, *,
                         site: str = "resid_pre", position: Position = "last", batch_size: int = 16) -> torch.Tensor:
    """Difference of mean activations (D,) of ``positive`` and ``negative`` texts at ``site`` of ``layer``."""
    if not positive or not negative:
        raise InputError("A direction needs at least one positive and one negative text.")
    (l,) = resolve_layers(model, [layer])
    pos, _ = collect(model, positive, site, [l], position=position, batch_size=batch_size)
    neg, _ = collect(model, negative, site, [l], position=position, batch_size=batch_size)
    return mean_difference(pos[l], neg[l])


def direction_from_labelled(model: Model, texts: Sequence[str], y: torch.Tensor | Sequence[int], layer: int, *,
                            site: str = "resid_pre", position: Position = "last", batch_size: int = 16) -> torch.Tensor:
    """Difference of means (D,) between texts labelled 1 and texts labelled 0."""
    y = torch.as_tensor(y).long()
    if set(torch.unique(y).tolist()) != {0, 1}:
        raise InputError("direction_from_labelled needs binary labels 0 and 1, both present.")
    (l,) = resolve_layers(model, [layer])
    acts, _ = collect(model, texts, site, [l], position=position, batch_size=batch_size)
    return mean_difference(acts[l][y == 1], acts[l][y == 0])


def caa_vector(model: Model, pairs: Sequence[tuple[str, str]], layer: int, *, site: str = "resid_pre",
               position: Position = -1, batch_size: int = 16) -> torch.Tensor:
    """CAA: mean over (positive, negative) prompt pairs of h(positive) − h(negative) at ``position``."""
    if not pairs:
        raise InputError("caa_vector needs at least one (positive, negative) pair.")
    pos, neg = zip(*pairs)
    return direction_from_texts(model, pos, neg, layer, site=site, position=position, batch_size=batch_size)


def actadd_vector(model: Model, positive: str, negative: str, layer: int, *, site: str = "resid_pre",
                  pad: str = " ") -> torch.Tensor:
    """ActAdd: h(p₊) − h(p₋) at every position (P, D); the shorter prompt is padded with ``pad`` tokens
    (the pad token where the tokenizer has no single-token space)."""
    (l,) = resolve_layers(model, [layer])
    ids = [model.tokenizer(p, add_special_tokens=True)["input_ids"] for p in (positive, negative)]
    if not all(ids):
        raise InputError("ActAdd needs two non-empty prompts.")
    pad_ids = model.tokenizer(pad, add_special_tokens=False)["input_ids"]
    if len(pad_ids) != 1 and pad == " " and model.tokenizer.pad_token_id is not None:
        pad_ids = [model.tokenizer.pad_token_id]  # a tokenizer without a space token: its pad token
    if len(pad_ids) != 1:
        raise InputError(f"The pad text {pad!r} must be one token; it splits into {len(pad_ids)}.")
    n = max(map(len, ids))
    rows = torch.tensor([i + pad_ids * (n - len(i)) for i in ids])
    name = f"blocks.{l}.{site}"
    run = model.run(rows, cache=[name], logits="none")
    acts = run[name].float()
    return (acts[0] - acts[1]).reshape(n, -1)


# ----------------------------------------------------------------------------------- projection / erasure
def _unit(direction: torch.Tensor) -> torch.Tensor:
    if direction.ndim != 1 or not torch.isfinite(direction).all() or direction.norm() == 0:
        raise InputError("A direction must be a finite, non-zero (D,) vector.")
    return direction.float() / direction.float().norm()


def project(acts: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Scalar projections (...,) of activations (..., D) onto the unit vector along ``direction``."""
    u = _unit(direction)
    _check_width(acts.shape[-1], u.shape[0], "project")
    return acts.float() @ u


def erase(acts: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Activations (..., D) with their component along ``direction`` removed (orthogonal projection)."""
    u = _unit(direction)
    _check_width(acts.shape[-1], u.shape[0], "erase")
    return acts - (acts.float() @ u).unsqueeze(-1).to(acts.dtype) * u.to(acts.dtype)


def _check_width(width: int, d: int, what: str) -> None:
    if width != d:
        raise InputError(f"{what}: the vector has width {d} but the site has width {width}. Build the vector at "
                         "the same kind of site (residual width for resid_*/attn_out/mlp_out) of the same model.")


# ----------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    """Greedy continuations: ``tokens`` (B, n) ids, ``log_probs`` (B, n, V) of every step, ``texts``."""

    prompts: list[str]
    tokens: torch.Tensor
    log_probs: torch.Tensor
    texts: list[str]


def _selector(positions: Sequence[int] | None, from_position: int | None, prompt_len: torch.Tensor):
    """(abs positions (B, t), row) -> bool (B, t): which positions receive the vector."""
    def select(abs_pos: torch.Tensor) -> torch.Tensor:
        if positions is None and from_position is None:
            return torch.ones_like(abs_pos, dtype=torch.bool)
        sel = torch.zeros_like(abs_pos, dtype=torch.bool)
        n = prompt_len[:, None]
        if positions is not None:
            for p in positions:
                target = p + n if p < 0 else torch.full_like(n, p)
                sel |= abs_pos == target
        if from_position is not None:
            start = from_position + n if from_position < 0 else torch.full_like(n, from_position)
            sel |= abs_pos >= start
        return sel
    return select


def generate(model: Model, prompts: str | Sequence[str], vector: torch.Tensor | None = None,
             layers: int | Sequence[int] = (), *, scale: float = 1.0, site: str = "resid_pre",
             positions: Sequence[int] | None = None, from_position: int | None = None,
             max_new_tokens: int = 20) -> Generation:
    """Greedy generation with ``scale * vector`` added at ``site`` of each of ``layers`` on every forward.

    ``vector`` (D,) goes to the selected positions: every position (default: prompt and generated
    tokens), the prompt ``positions`` listed (negative counts from the prompt's end), and/or every
    position from ``from_position`` on (CAA adds from the end of the instruction). A (P, D) ActAdd
    vector is added front-aligned: row i at position i, for i < P. Positions count from each prompt's
    first token (left padding is accounted for). ``vector=None`` or ``scale=0`` gives the plain model.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    batch = model.encode(prompts, padding_side="left")
    step_ivs = None
    if vector is not None:
        layers = resolve_layers(model, [layers] if isinstance(layers, int) else list(layers))
        step_ivs = _adder(model, vector, layers, scale, site, positions, from_position, batch.lengths)
    tokens, logps = model.generate(batch, max_new_tokens, step_ivs)
    return Generation(prompts, tokens, logps, [model.decode(row.tolist()) for row in tokens])


def _adder(model: Model, vector: torch.Tensor, layers: list[int], scale: float, site: str,
           positions: Sequence[int] | None, from_position: int | None, prompt_len: torch.Tensor) -> StepInterventions:
    """The per-forward Add interventions of :func:`generate`, after checking the vector."""
    vec = vector.detach().float()
    if vec.ndim not in (1, 2):
        raise InputError(f"A steering vector is (D,) or (P, D) for ActAdd; got shape {tuple(vec.shape)}.")
    if not torch.isfinite(vec).all():
        raise InputError("The steering vector holds NaN or infinite values.")
    if site.startswith(("resid", "attn_out", "mlp_out")):
        _check_width(model.spec.d_model, vec.shape[-1], f"Steering at {site} of {model.name}")
    if vec.ndim == 2 and (positions is not None or from_position is not None):
        raise InputError("An ActAdd (P, D) vector is added at positions 0..P-1; do not also give positions.")
    select = _selector(positions, from_position, prompt_len)

    def step_ivs(abs_pos: torch.Tensor, real: torch.Tensor) -> list:
        if vec.ndim == 1:
            delta = (select(abs_pos) & real).unsqueeze(-1).float() * vec
        else:
            on = (abs_pos < vec.shape[0]) & real
            delta = vec[abs_pos.clamp(max=vec.shape[0] - 1)] * on.unsqueeze(-1).float()
        return [Add(f"blocks.{l}.{site}", delta, scale=scale) for l in layers] if scale != 0 else []

    return step_ivs


def steer(model: Model, prompt: str, positive: str, negative: str, layer: int, *, scale: float = 4.0,
          site: str = "resid_pre", max_new_tokens: int = 20) -> tuple[Generation, Generation, torch.Tensor]:
    """ActAdd in one call: the (P, D) vector of (positive, negative) at ``layer`` added to ``prompt``'s
    first P positions with ``scale``. Returns (unsteered, steered, vector)."""
    vec = actadd_vector(model, positive, negative, layer, site=site)
    plain = generate(model, prompt, max_new_tokens=max_new_tokens)
    steered = generate(model, prompt, vec, layer, scale=scale, site=site, max_new_tokens=max_new_tokens)
    return plain, steered, vec


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class SteerConfig:
    """Steering with a vector from one prompt pair."""

    positive: str = specs.option(help="Positive prompt, e.g. ' Love'.")
    negative: str = specs.option(help="Negative prompt, e.g. ' Hate'.")
    layer: int = specs.option(help="Layer whose input (resid_pre) receives the vector.")
    scale: float = specs.option(4.0, "Multiplier of the vector.")
    method: str = specs.option("actadd", "actadd: per-position h(+) − h(−) added at the first positions; mean: "
                                         "last-token difference added everywhere.", choices=("actadd", "mean"))
    max_new_tokens: int = specs.option(20, "Tokens to generate.")

    def __post_init__(self):
        if self.method not in ("actadd", "mean"):
            raise InputError(f"--method {self.method!r}: use actadd or mean.")
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1.")


def generation_result(model: Model, generations: Sequence[Generation], labels: Sequence[str], method: str,
                      target: dict | None, params: dict, extras: dict | None = None, meta: dict | None = None) -> Result:
    """Greedy generations as one Result: values (variant, step) log-probabilities of the chosen tokens,
    meta ``texts`` and ``tokens`` per variant (first prompt of each generation)."""
    chosen = [g.log_probs[0].gather(-1, g.tokens[0][:, None])[:, 0] for g in generations]
    steps = tuple(str(i) for i in range(generations[0].tokens.shape[1]))
    meta = {"texts": [g.texts[0] for g in generations],
            "tokens": [[model.decode([i]) for i in g.tokens[0].tolist()] for g in generations], **(meta or {})}
    return Result(torch.stack(chosen), (Axis("variant", tuple(labels)), Axis("step", steps)), method, model.name,
                  target, params, extras or {}, meta)


def run_steer(model: Model, prompt: specs.Prompt, config: SteerConfig) -> Result:
    """Steering: generate with and without a vector from a prompt pair added to the residual stream."""
    if config.method == "actadd":
        vec = actadd_vector(model, config.positive, config.negative, config.layer)
    else:
        vec = direction_from_texts(model, [config.positive], [config.negative], config.layer)
    plain = generate(model, prompt.text, max_new_tokens=config.max_new_tokens)
    steered = generate(model, prompt.text, vec, config.layer, scale=config.scale, max_new_tokens=config.max_new_tokens)
    return generation_result(model, [plain, steered], ("unsteered", "steered"), "steer",
                             {"positive": config.positive, "negative": config.negative},
                             {"layer": config.layer, "scale": config.scale, "method": config.method,
                              "max_new_tokens": config.max_new_tokens}, {"vector": vec}, {"prompt": prompt.text})


specs.register(specs.MethodSpec("steer", "decoding", "prompt", SteerConfig, run_steer, sites=("resid_pre",),
                                cli_inputs=("text",)))
