"""``lmscope attribute --evaluate``: rank every attribution method by faithfulness on task sets.

The spec runs :mod:`.faithfulness` on the built-in tasks (IOI, factual recall, induction; prompts from
the task generators, each explained as logit(target) − logit(foil)) and returns one Result of shape
(task + "all", method + "random", measure) with the measures:

* ``comprehensiveness`` and ``sufficiency``: AOPC in logit-difference units, mean over prompts;
* ``comp-suff``: their difference, the ranking score (random ≈ 0);
* ``rho_model_random`` / ``rho_target_random``: mean Spearman correlation with the attribution on a
  copy of the model with its top blocks re-initialised / for a random target and foil (Adebayo et
  al. 2018; lower means the method passes; the random attribution has none).

``extras`` hold the per-prompt AOPCs of every task; ``meta`` the replacement, prompt counts, the
re-initialised blocks and the worst integrated-gradients completeness error met.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.attribution.faithfulness import RANDOM, evaluate_prompts, randomized_top
from lmscope.attribution.methods import METHODS

TASKS = ("ioi", "factual", "induction")
MEASURES = ("comprehensiveness", "sufficiency", "comp-suff", "rho_model_random", "rho_target_random")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of the faithfulness evaluation of attribution methods."""

    tasks: tuple[str, ...] = specs.option(TASKS, "Built-in task sets: ioi | factual | induction.")
    n: int = specs.option(100, "Prompts per task (factual recall has as many as its capital table allows).")
    methods: tuple[str, ...] = specs.option(METHODS, "Attribution methods to rank (default: all ten).")
    replacement: str = specs.option("neutral", "What replaces an erased token's embedding: neutral (UNK, else "
                                               "PAD, else EOS; IG's default baseline) | eos | unk | pad | zero | a "
                                               "token such as ' the'.")
    sanity: int = specs.option(20, "Prompts per task for the sanity checks (model and target randomisation); "
                                   "0 skips them.")
    randomize_top: int | None = specs.option(None, "Blocks re-initialised for the model-randomisation check "
                                                   "(default: the upper half).")
    seed: int = specs.option(0, "Seed of the task prompts, the random attribution and the randomisations.")

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise InputError(f"--tasks {list(self.tasks)}: choose from {', '.join(TASKS)}.")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"--methods {bad or '(none)'}: choose from {', '.join(METHODS)}.")
        if self.n < 1:
            raise InputError(f"--n {self.n}: give at least one prompt per task (100 for the reported table).")
        if self.sanity < 0:
            raise InputError(f"--sanity {self.sanity}: give 0 (skip) or a number of prompts.")
        if self.replacement == "scaled":
            raise InputError("--replacement scaled keeps each token's identity; erase with eos, unk, pad, zero "
                             "or a token.")


def _summary(res: dict) -> torch.Tensor:
    """(M + 1, len(MEASURES)) means over prompts of one task's per-prompt numbers."""
    comp, suff = res["comprehensiveness"].mean(0), res["sufficiency"].mean(0)
    pad = torch.tensor([float("nan")], dtype=torch.float64)
    rho_m = torch.cat([res["model_randomisation"].nanmean(0), pad])
    rho_t = torch.cat([res["target_randomisation"].nanmean(0), pad])
    return torch.stack([comp, suff, comp - suff, rho_m, rho_t], dim=1)


def evaluate_attributions(model: Model, config: EvaluateConfig = EvaluateConfig(),
                          prompt_sets: dict[str, list[tuple]] | None = None) -> Result:
    """The faithfulness table (task, method, measure); ``prompt_sets`` (name -> (text, target, foil)
    triples) replaces the built-in tasks."""
    if prompt_sets is None:
        prompt_sets = {}
        for task in config.tasks:
            pairs = specs.inputs_from_json(model, "pairs", {"task": task, "n": config.n, "seed": config.seed})
            prompt_sets[task] = list(zip(pairs.clean, pairs.targets, pairs.foils))
    randomized = randomized_top(model, config.randomize_top, config.seed) if config.sanity else None
    rows, extras, meta_tasks, worst, desc = [], {}, {}, 0.0, ""
    total = sum(len(p) for p in prompt_sets.values())
    with tqdm(total=total, desc="attribution faithfulness", leave=False) as bar:
        for task, prompts in prompt_sets.items():
            res = evaluate_prompts(model, prompts, config.methods, replacement=config.replacement,
                                   seed=config.seed, sanity=config.sanity, randomized=randomized, progress=bar)
            rows.append(_summary(res))
            extras[f"{task}.comprehensiveness"] = res["comprehensiveness"]
            extras[f"{task}.sufficiency"] = res["sufficiency"]
            meta_tasks[task] = {"prompts": len(prompts), "sanity_prompts": len(res["target_randomisation"])}
            worst, desc = max(worst, res["ig_worst_relative_delta"]), res["replacement"]
    per_prompt = {k: torch.cat([extras[f"{t}.{k}"] for t in prompt_sets]) for k in ("comprehensiveness", "sufficiency")}
    overall = torch.stack([t for t in rows]).nanmean(0)  # tasks weighted equally
    overall[:, :3] = torch.stack([per_prompt["comprehensiveness"].mean(0), per_prompt["sufficiency"].mean(0),
                                  (per_prompt["comprehensiveness"] - per_prompt["sufficiency"]).mean(0)], dim=1)
    values = torch.stack([*rows, overall]).float()
    axes = (Axis("task", (*prompt_sets, "all")), Axis("method", (*config.methods, RANDOM)), Axis("measure", MEASURES))
    n = model.spec.n_layers
    top = max(1, n // 2) if config.randomize_top is None else config.randomize_top
    meta = {"replacement": desc, "tasks": meta_tasks, "metric": "logit(target) − logit(foil) at the last position",
            "randomized_blocks": list(range(n - top, n)) if config.sanity else [],
            "ig_worst_relative_delta": worst, "erasable": "all positions but the first and special tokens"}
    return Result(values, axes, "attribute_evaluate", model.name, None, specs.config_to_json(config), extras, meta)


def run_evaluate(model: Model, inputs, config: EvaluateConfig) -> Result:
    """Rank every attribution method by faithfulness: erasure AOPC on IOI, factual recall and induction
    prompts, a random baseline and the Adebayo et al. sanity checks."""
    return evaluate_attributions(model, config)


specs.register(specs.MethodSpec("attribute-evaluate", "attribution", "none", EvaluateConfig, run_evaluate,
                                cli=("attribute", "evaluate"), sites=("embed", "attn.pattern")))
