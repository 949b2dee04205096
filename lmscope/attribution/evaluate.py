"""``lmscope attribute --evaluate``: rank every attribution method by faithfulness on task sets.

The spec runs :mod:`.faithfulness` on the built-in tasks, each prompt explained as logit(target) −
logit(foil): ``ioi`` (the IOI generator), ``factual`` (the ``recall`` task: GeoNames facts that the
model recalls, :mod:`lmscope.localization.recall`; target its answer, foil another fact's answer) and
``induction`` (repeated random tokens). It returns one Result of shape (task + "all", method +
"random", measure) with the measures:

* ``comprehensiveness`` and ``sufficiency``: AOPC in logit-difference units, mean over prompts;
* ``comp-suff``: their difference, the ranking score (random ≈ 0);
* ``rho_model_random`` / ``rho_target_random``: mean Spearman correlation with the attribution on a
  copy of the model with its top blocks re-initialised / for a random target and foil (Adebayo et
  al. 2018; lower means the method passes; the random attribution has none).

``extras`` hold the per-prompt AOPCs of every task (NaN where a method ran on a subset) and the clean
target − foil values ``f``; ``meta`` the replacement, prompt counts, the fraction of prompts where the
model prefers the target (``accuracy``), the prompts per method, the random attribution's score on a
subset method's prompts (a like-for-like baseline), the re-initialised blocks and the worst
integrated-gradients completeness error met.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    n: int = specs.option(100, "Prompts per task.")
    methods: tuple[str, ...] = specs.option(METHODS, "Attribution methods to rank (default: all ten).")
    replacement: str = specs.option("neutral", "What replaces an erased token's embedding: neutral (UNK, else "
                                               "PAD, else EOS; IG's default baseline) | eos | unk | pad | zero | a "
                                               "token such as ' the'.")
    sanity: int = specs.option(20, "Prompts per task for the sanity checks (model and target randomisation); "
                                   "0 skips them.")
    ig_prompts: int | None = specs.option(None, "Prompts per task for integrated gradients (default: all); it "
                                                "costs ~100 forward-backward passes per prompt, so a CPU run may "
                                                "give it the first k prompts only (stated in the table).")
    induction_length: int = specs.option(10, "Random tokens repeated in each induction prompt (2 × length − 1 "
                                             "tokens).")
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
        if self.ig_prompts is not None and self.ig_prompts < 1:
            raise InputError(f"--ig-prompts {self.ig_prompts}: give a positive number (or leave it out: all).")
        if self.induction_length < 2:
            raise InputError(f"--induction-length {self.induction_length}: give at least 2 tokens.")
        if self.sanity < 0:
            raise InputError(f"--sanity {self.sanity}: give 0 (skip) or a number of prompts.")
        if self.replacement == "scaled":
            raise InputError("--replacement scaled keeps each token's identity; erase with eos, unk, pad, zero "
                             "or a token.")


def _summary(res: dict) -> torch.Tensor:
    """(M + 1, len(MEASURES)) means over prompts of one task's per-prompt numbers."""
    comp, suff = res["comprehensiveness"].nanmean(0), res["sufficiency"].nanmean(0)
    pad = torch.tensor([float("nan")], dtype=torch.float64)
    rho_m = torch.cat([res["model_randomisation"].nanmean(0), pad])
    rho_t = torch.cat([res["target_randomisation"].nanmean(0), pad])
    return torch.stack([comp, suff, comp - suff, rho_m, rho_t], dim=1)


def evaluate_attributions(model: Model, config: EvaluateConfig = EvaluateConfig(),
                          prompt_sets: dict[str, list[tuple]] | None = None) -> Result:
    """The faithfulness table (task, method, measure); ``prompt_sets`` (name -> (text, target, foil)
    triples) replaces the built-in tasks."""
    if prompt_sets is None:
        prompt_sets = {task: task_prompts(model, task, config.n, config.seed, config.induction_length)
                       for task in config.tasks}
    randomized = randomized_top(model, config.randomize_top, config.seed) if config.sanity else None
    limits = {"integrated-gradients": config.ig_prompts} if config.ig_prompts is not None else {}
    rows, extras, meta_tasks, worst, desc = [], {}, {}, 0.0, ""
    total = sum(len(p) for p in prompt_sets.values())
    with tqdm(total=total, desc="attribution faithfulness", leave=False) as bar:
        for task, prompts in prompt_sets.items():
            res = evaluate_prompts(model, prompts, config.methods, replacement=config.replacement,
                                   seed=config.seed, sanity=config.sanity, randomized=randomized, progress=bar,
                                   limits=limits)
            rows.append(_summary(res))
            for key in ("comprehensiveness", "sufficiency", "f"):
                extras[f"{task}.{key}"] = res[key]
            meta_tasks[task] = {"prompts": len(prompts), "sanity_prompts": len(res["target_randomisation"]),
                                "accuracy": float((res["f"] > 0).double().mean())}
            worst, desc = max(worst, res["ig_worst_relative_delta"]), res["replacement"]
    n = model.spec.n_layers
    top = max(1, n // 2) if config.randomize_top is None else config.randomize_top
    meta = {"replacement": desc, "tasks": meta_tasks, "metric": "logit(target) − logit(foil) at the last position",
            "randomized_blocks": list(range(n - top, n)) if config.sanity else [],
            "ig_worst_relative_delta": worst, "erasable": "all positions but the first and special tokens"}
    return _table(torch.stack(rows), (*config.methods, RANDOM), extras, meta, model.name,
                  specs.config_to_json(config))


def task_prompts(model: Model, task: str, n: int, seed: int, induction_length: int = 10) -> list[tuple]:
    """(text, target, foil) triples of a built-in task; ``factual`` is the ``recall`` task (facts the model
    knows)."""
    doc = {"task": "recall" if task == "factual" else task, "n": n, "seed": seed}
    if task == "induction":
        doc["seq_len"] = induction_length
    pairs = specs.inputs_from_json(model, "pairs", doc)
    return list(zip(pairs.clean, pairs.targets, pairs.foils))


def _table(rows: torch.Tensor, methods: tuple[str, ...], extras: dict, meta: dict, model: str, params: dict) -> Result:
    """The Result from per-task rows (K, M + 1, len(MEASURES)) and the per-prompt extras: the "all" row
    pools the prompts of every task for the AOPCs and weights tasks equally for the correlations."""
    tasks = list(meta["tasks"])
    per_prompt = {k: torch.cat([extras[f"{t}.{k}"] for t in tasks]) for k in ("comprehensiveness", "sufficiency")}
    net = per_prompt["comprehensiveness"] - per_prompt["sufficiency"]  # (N, M + 1), NaN where a method did not run
    overall = rows.nanmean(0)
    overall[:, :3] = torch.stack([per_prompt["comprehensiveness"].nanmean(0), per_prompt["sufficiency"].nanmean(0),
                                  net.nanmean(0)], dim=1)
    ran = ~net.isnan()
    meta = {**meta, "subsets": {m: {"prompts": int(ran[:, i].sum()), "random_comp_suff": float(net[ran[:, i], -1].mean())}
                                for i, m in enumerate(methods[:-1]) if not ran[:, i].all()}}
    axes = (Axis("task", (*tasks, "all")), Axis("method", methods), Axis("measure", MEASURES))
    return Result(torch.cat([rows, overall[None]]).float(), axes, "attribute_evaluate", model, None, params,
                  extras, meta)


def merge_evaluations(results: Sequence[Result]) -> Result:
    """One table from evaluations of different task sets (e.g. one run per task, so that a long run
    keeps what it finished): same model, methods, replacement and randomised blocks required."""
    if not results:
        raise InputError("merge_evaluations needs at least one attribute-evaluate result.")
    first = results[0]
    keys = ("replacement", "randomized_blocks")
    for r in results:
        if r.method != "attribute_evaluate":
            raise InputError(f"merge_evaluations takes attribute-evaluate results, got {r.method!r}.")
        if (r.model, r.axes[1].labels, [r.meta[k] for k in keys]) != (first.model, first.axes[1].labels,
                                                                      [first.meta[k] for k in keys]):
            raise InputError("merge_evaluations: the results differ in model, methods, replacement or randomised "
                             "blocks; evaluate them with the same settings.")
    tasks = [t for r in results for t in r.meta["tasks"]]
    if len(set(tasks)) != len(tasks):
        raise InputError(f"merge_evaluations: a task appears twice ({tasks}); merge different task sets.")
    rows = torch.cat([r.values[:-1].double() for r in results])
    extras = {k: v for r in results for k, v in r.extras.items()}
    meta = {"replacement": first.meta["replacement"], "tasks": {t: d for r in results for t, d in r.meta["tasks"].items()},
            "metric": first.meta["metric"], "randomized_blocks": first.meta["randomized_blocks"],
            "ig_worst_relative_delta": max(r.meta["ig_worst_relative_delta"] for r in results),
            "erasable": first.meta["erasable"], "merged": [r.params for r in results]}
    return _table(rows, first.axes[1].labels, extras, meta, first.model, first.params)


def run_evaluate(model: Model, inputs, config: EvaluateConfig) -> Result:
    """Rank every attribution method by faithfulness: erasure AOPC on IOI, factual recall and induction
    prompts, a random baseline and the Adebayo et al. sanity checks."""
    return evaluate_attributions(model, config)


specs.register(specs.MethodSpec("attribute-evaluate", "attribution", "none", EvaluateConfig, run_evaluate,
                                cli=("attribute", "evaluate"), sites=("embed", "attn.pattern")))
