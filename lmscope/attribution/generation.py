"""Attributing whole generations (the Inseq protocol, Sarti et al., 2023).

1. Generate a continuation ``y_1..y_G`` of the prompt ``x_1..x_P``: greedy by default
   (:meth:`Model.generate`, stopping after the first end-of-sequence token), or with the user's
   ``generate_kwargs`` for the model's native ``generate`` (:meth:`Model.sample`: sampling, beams).
2. For each step s, force-decode the prefix ``(x, y_<s)`` and attribute the step's target (default
   the probability of ``y_s``) to every prefix token with the chosen method.
3. Stack the steps: a matrix (P + G − 1 prefix positions) × (G generated tokens), NaN where a
   position is not in the step's prefix (the generated part is lower-triangular), with the step
   scores beside it (``extras["step_probability"]``, the probability of each generated token, and
   ``extras["step_delta"]`` for integrated gradients).

Context-mixing methods without a target (attention, rollout, attention-norm, ALTI, value zeroing)
run once over the whole sequence: column s is the aggregated row of the position that predicts
``y_s`` (causal models give each prefix the same rows).
"""

from __future__ import annotations

import torch

from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.attribution.methods import MIXING_METHODS, TARGET_METHODS, method_function


def generate(model: Model, prompt: str, max_new_tokens: int, generate_kwargs: dict | None = None) -> torch.Tensor:
    """(P + G,) ids: the prompt and its continuation (greedy unless ``generate_kwargs`` say otherwise)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"generate={max_new_tokens!r}: ask for at least 1 new token.")
    batch = model.encode(prompt)
    p = batch.input_ids.shape[1]
    if p + max_new_tokens > model.spec.n_ctx:
        raise InputError(f"The prompt has {p} tokens; generating {max_new_tokens} more would pass {model.name}'s "
                         f"context limit of {model.spec.n_ctx} tokens. Ask for at most {model.spec.n_ctx - p} "
                         "new tokens or shorten the prompt.")
    if generate_kwargs:
        return model.sample(batch, max_new_tokens, **generate_kwargs)[0]
    new = model.generate(batch, max_new_tokens)[0][0].tolist()
    stops = [i for i, tok in enumerate(new) if tok in model.eos_token_ids]
    if stops:  # the native generate stops after the first end-of-sequence token; so does this
        new = new[:stops[0] + 1]
    return torch.cat([batch.input_ids[0], torch.tensor(new, dtype=batch.input_ids.dtype)])


def attribute_generation(model: Model, prompt: str, method: str = "saliency", *, max_new_tokens: int = 10,
                         generate_kwargs: dict | None = None, metric: str = "probability",
                         **method_kwargs) -> Result:
    """Attribute every generated token to every earlier token: values (position, generated)."""
    fn = method_function(method)
    if "foil" in method_kwargs and method_kwargs["foil"] is not None:
        raise InputError("A foil is a single token to contrast with one target; generation attribution "
                         "explains each generated token on its own. Leave the foil out.")
    method_kwargs.pop("foil", None)
    ids = generate(model, prompt, max_new_tokens, generate_kwargs)
    p = model.encode(prompt).input_ids.shape[1]
    g = ids.shape[0] - p
    if g < 1:
        raise InputError("The model generated no tokens (it stopped at once); try other generation settings.")
    tokens = [model.decode([i]) for i in ids.tolist()]
    values = torch.full((p + g - 1, g), float("nan"))
    step_prob = torch.zeros(g)
    with torch.no_grad():
        logits = model.run(ids[None, :-1], logits="all").logits[0].float().cpu()
    probs = logits.softmax(dim=-1)
    for s in range(g):
        step_prob[s] = probs[p + s - 1, ids[p + s]]
    extras = {"step_probability": step_prob}
    if method in MIXING_METHODS:
        from lmscope.attribution.context_mixing import token_scores

        full = fn(model, ids[None, :-1], **method_kwargs)
        for s in range(g):
            row = token_scores(full, p + s - 1).values
            values[: p + s, s] = row[: p + s]
    else:
        deltas = []
        for s in range(g):
            kwargs = dict(method_kwargs)
            if method in TARGET_METHODS and method != "alti-logit":
                kwargs["metric"] = metric
            r = fn(model, ids[None, : p + s], int(ids[p + s]), **kwargs)
            values[: p + s, s] = r.values
            if "delta" in r.meta:
                deltas.append(r.meta["delta"])
        if deltas:
            extras["step_delta"] = torch.tensor(deltas)
    axes = (Axis("position", tuple(tokens[:-1])), Axis("generated", tuple(tokens[p:])))
    params = {"method": method, "max_new_tokens": max_new_tokens, "metric": metric,
              "generate_kwargs": {k: v for k, v in (generate_kwargs or {}).items()
                                  if isinstance(v, (int, float, str, bool))},
              **{k: v for k, v in method_kwargs.items() if isinstance(v, (int, float, str, bool))}}
    return Result(values, axes, f"{method_name(method)}_generation", model.name, None, params, extras,
                  {"tokens": tokens, "prompt_length": p, "generated": model.decode(ids[p:].tolist())})


def method_name(method: str) -> str:
    return method.replace("-", "_")
