"""Targets: the scalar function of the model's output that an attribution explains.

A target is one token's logit, probability or log-probability at one position (default: the last
token), or a contrastive difference between a target and a foil token (Yin & Neubig, 2022): logit
difference, probability difference, or log-probability difference (numerically the logit
difference, since the normaliser cancels). Every method in :mod:`lmscope.attribution` takes
``target``, ``foil`` and ``metric`` and resolves them here.

Shapes: ``Target.score(logits (N, T, V) or (N, V)) -> (N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import sites
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.targets import canonical_metric, resolve_tokens

METRICS = ("logit", "probability", "log_probability")
_SPELLING = {"logit": "logit", "probability": "probability", "log_prob": "log_probability"}  # shared -> ours


@dataclass(frozen=True)
class Target:
    """A resolved target: token ids, metric and position (``None``: each row's last token)."""

    target_id: int
    foil_id: int | None
    metric: str
    position: int | None
    target_text: str
    foil_text: str | None

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        """(N,) target values from logits (N, T, V) (read at ``position``) or (N, V)."""
        if logits.ndim == 3:
            logits = logits[:, -1 if self.position is None else self.position]
        logits = logits.float()
        if self.metric == "logit":
            pick = logits
        elif self.metric == "probability":
            pick = logits.softmax(dim=-1)
        else:
            pick = logits.log_softmax(dim=-1)
        value = pick[:, self.target_id]
        return value if self.foil_id is None else value - pick[:, self.foil_id]

    def describe(self) -> dict:
        doc = {"target": self.target_text, "target_id": self.target_id, "metric": self.metric,
               "position": self.position}
        if self.foil_id is not None:
            doc.update(foil=self.foil_text, foil_id=self.foil_id)
        return doc

    @property
    def label(self) -> str:
        name = {"logit": "logit", "probability": "p", "log_probability": "log p"}[self.metric]
        if self.foil_id is None:
            return f"{name}({self.target_text!r})"
        return f"{name}({self.target_text!r}) − {name}({self.foil_text!r})"


def resolve_target(model: Model, target: str | int, foil: str | int | None = None, metric: str = "logit",
                   position: int | None = None) -> Target:
    """Check the tokens and metric (any name of :mod:`lmscope.targets`); a foil equal to the target is an
    error that names the fix."""
    metric = _SPELLING[canonical_metric(metric, tuple(_SPELLING), "attribution")]
    t, f = resolve_tokens(model, target, foil)
    return Target(t, f, metric, position, model.decode([t]), None if f is None else model.decode([f]))


def top_token(model: Model, prompt: str, position: int | None = None) -> int:
    """The id of the model's top-1 next token after ``prompt`` (read at ``position``, default the last)."""
    with torch.no_grad():
        logits = model.run(prompt, logits="all").logits[0]
    return int(logits[resolve_position(position, logits.shape[0])].argmax())


def resolve_position(position: int | None, n_tokens: int) -> int:
    """A non-negative position inside a sequence of ``n_tokens`` (None: the last); RangeError otherwise."""
    return sites.resolve_position(position, n_tokens)


def logit_vector(model: Model, target: Target, scale: torch.Tensor) -> torch.Tensor:
    """(D,) vector v with ``logit(target) [− logit(foil)] = resid · v + const`` under the final norm's
    scale frozen at ``scale`` (a scalar 1/s): a component c contributes ``c · v``."""
    if target.metric != "logit":
        raise InputError(f"This method decomposes logits linearly; metric={target.metric!r} is not linear in "
                         "the residual stream. Use metric='logit'.")
    return model.logit_direction(target.target_id, target.foil_id, scale=scale.reshape(())).vector


def token_result(model: Model, tokens: list[str], values: torch.Tensor, method: str, target: Target | None,
                 params: dict, extras: dict | None = None, meta: dict | None = None) -> Result:
    """A Result over the prompt's tokens (axis ``token``)."""
    return Result(values, (Axis("token", tuple(tokens)),), method, model.name,
                  None if target is None else target.describe(), params, extras or {},
                  {"tokens": list(tokens), **(meta or {})})
