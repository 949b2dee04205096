"""Patch one residual cell from the clean prompt into the corrupted one, and see where it spreads
(the app's drag-to-patch, after NDIF Workbench).

The clean run's ``blocks.{layer}.resid_pre`` at position ``position`` replaces the corrupted run's at
``to_position`` (the same position by default; another one moves information between positions). One forward
of the corrupted prompt with the patch, one without, and the clean run give:

* the metric at the last position, shared vocabulary (:mod:`lmscope.targets`: the logit difference with a foil,
  else the target's log-probability), clean, corrupted and patched, and the normalised effect
  ``(M_patched − M_corrupt) / (M_clean − M_corrupt)`` (1: the cell alone restores the clean behaviour);
* where the patch spreads: for every layer l and position j, the relative change of the corrupted run's
  residual stream after block l, ``‖r'_{l,j} − r_{l,j}‖ / ‖r_{l,j}‖`` (values, (layer, position)). It is exactly
  zero outside the patch's causal cone (layers ≥ ``layer``, positions ≥ ``to_position``) in a causal model;
  inside, it shows how far the patched information travels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.localization.metrics import Metric, normalise
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_index, resolve_position
from lmscope.targets import canonical_metric, default_metric

METRICS = ("logit_diff", "log_prob", "probability")


@dataclass(frozen=True)
class PatchCellConfig:
    """One residual cell patched from the clean into the corrupted prompt; its effect and its spread."""

    layer: int = specs.option(0, "Layer whose input (resid_pre) is patched.")
    position: int | None = specs.option(None, "Position read in the clean prompt (default: last).")
    to_position: int | None = specs.option(None, "Position written in the corrupted prompt (default: the same).")
    metric: str | None = specs.option(None, "logit_diff | log_prob | probability (default: logit_diff with a "
                                            "foil, else log_prob).", choices=METRICS)

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise InputError(f"layer={self.layer!r}: give a layer index.")
        if self.metric is not None:
            object.__setattr__(self, "metric", canonical_metric(self.metric, METRICS, "patch-cell"))


def run_patch_cell(model: Model, pairs: PromptPairs, config: PatchCellConfig) -> Result:
    """Patch one resid_pre cell from the clean into the corrupted prompt: the metric and where it spreads."""
    if len(pairs) != 1:
        raise InputError(f"patch-cell patches one prompt pair, got {len(pairs)}.")
    s = model.spec
    layer = resolve_index(config.layer, s.n_layers, "layer", model.name)
    clean, corrupt = pairs.clean[0], pairs.corrupt[0]
    site = f"blocks.{layer}.resid_pre"
    after = [f"blocks.{l}.resid_post" for l in range(s.n_layers)]
    with torch.no_grad():
        c = model.run(clean, cache=[site], logits="last")
        t_clean, t = c.batch.input_ids.shape[1], len(model.to_str_tokens(corrupt))
        src, dst = resolve_position(config.position, t_clean), resolve_position(
            config.position if config.to_position is None else config.to_position, t)
        value = c[site][0, src]
        base = model.run(corrupt, cache=after, logits="last")
        patched = model.run(corrupt, cache=after, interventions=[Patch(site, value=value, positions=[dst])],
                            logits="last")
        r0 = torch.stack([base[k][0] for k in after]).float()     # (L, T, D)
        r1 = torch.stack([patched[k][0] for k in after]).float()
        change = (r1 - r0).norm(dim=-1) / r0.norm(dim=-1).clamp_min(1e-12)
    targets, foils = pairs.token_ids(model)
    name = config.metric or default_metric(pairs.foils[0])
    if name == "logit_diff" and foils is None:
        raise InputError("metric logit_diff needs a foil token: give the pair's foil (e.g. ' John').")
    metric = Metric(name, targets, foils if name == "logit_diff" else None)
    m_clean, m_corrupt, m_patched = (float(metric(x.logits.float())) for x in (c, base, patched))
    effect = float(normalise(torch.tensor(m_patched), m_clean, m_corrupt))
    tokens = patched.batch.str_tokens[0]
    meta = {"clean_tokens": c.batch.str_tokens[0], "tokens": tokens, "metric": name, "clean": m_clean,
            "corrupt": m_corrupt, "patched": m_patched, "effect": effect, "layer": layer, "position": src,
            "to_position": dst, "cone": {"layers": [layer, s.n_layers - 1], "positions": [dst, t - 1]}}
    target = {"target": pairs.targets[0]} | ({"foil": pairs.foils[0]} if pairs.foils[0] is not None else {})
    return Result(change, (Axis("layer", tuple(str(l) for l in range(s.n_layers))),
                           Axis("position", tuple(f"{j}:{tok}" for j, tok in enumerate(tokens)))),
                  "patch-cell", model.name, target,
                  {"layer": config.layer, "position": config.position, "to_position": config.to_position,
                   "metric": name}, {}, meta)


specs.register(specs.MethodSpec("patch-cell", "localization", "pairs", PatchCellConfig, run_patch_cell,
                                sites=("resid_pre", "resid_post"), cli_inputs=("clean", "corrupt", "target", "foil")))
