"""Methods on saved SAE folders, as specs: evaluate one SAE (``sae-eval``), build its feature dashboards
(``sae-features``), compare several (``sae-compare``). CLI: ``lmscope sae eval | features | compare``.

Their input kind is ``sae``: one or more SAE folders (``cfg.json`` + ``sae_weights.safetensors``, as written
by :func:`lmscope.sae.save_sae` or SAELens) and the corpus whose held-out split they are measured on.
JSON forms: ``"folder"``, ``["folder", ...]`` or ``{"saes": folder_or_list, "corpus": "default"}``.

Each spec has a ``check`` that needs no model (the folders are readable SAEs, saved evaluations are
evaluations, the folder can take ``eval.json``): the command line runs it before loading the model, and
the model defaults to the one the first SAE was trained on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmscope import specs
from lmscope.errors import InputError, ResultFormatError
from lmscope.models import Model
from lmscope.results import Result
from lmscope.sae.evaluation import METRICS, compare, evaluate, pareto_png
from lmscope.sae.features import feature_report, features_html, top_activations
from lmscope.sae.io import check_fits, load_sae

EVAL_FILE = "eval.json"
CONTEXT = 128  # tokens per held-out context


@dataclass(frozen=True)
class SAEFolders:
    """SAE folders and the corpus whose held-out split they are evaluated on."""

    folders: tuple[str, ...]
    corpus: str = "default"

    def __post_init__(self):
        if isinstance(self.folders, (str, os.PathLike)):
            object.__setattr__(self, "folders", (str(self.folders),))
        object.__setattr__(self, "folders", tuple(str(f) for f in self.folders))
        if not self.folders:
            raise InputError("Give at least one SAE folder.")

    def one(self, method: str) -> Path:
        if len(self.folders) != 1:
            raise InputError(f"{method} takes one SAE folder, got {len(self.folders)}; use `lmscope sae compare` "
                             "for several.")
        return Path(self.folders[0])

    def model_name(self) -> str | None:
        """The model the first SAE was trained on (None when its file does not say)."""
        return load_sae(self.folders[0]).cfg.model or None


def sae_folders_from_json(model, doc) -> SAEFolders:
    if isinstance(doc, SAEFolders):
        return doc
    if isinstance(doc, (str, list)):
        return SAEFolders(tuple(doc) if isinstance(doc, list) else (doc,))
    if isinstance(doc, dict) and "saes" in doc and not set(doc) - {"saes", "corpus"}:
        saes = doc["saes"]
        return SAEFolders(tuple(saes) if isinstance(saes, list) else (saes,), doc.get("corpus") or "default")
    raise InputError('An SAE input is "folder", ["folder", ...] or {"saes": folder_or_list, "corpus": "default"}.')


def _held_out(model: Model, inputs: SAEFolders, contexts: int) -> torch.Tensor:
    from lmscope.data import token_contexts

    return token_contexts(model, inputs.corpus, context=CONTEXT, split="heldout", max_tokens=CONTEXT * contexts)


def _check_counts(config, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise InputError(f"--{name} {getattr(config, name)}: give 1 or more.")


# ------------------------------------------------------------------------------------------------ eval
@dataclass(frozen=True)
class SAEEvalConfig:
    """Options of ``sae-eval``."""

    contexts: int = specs.option(32, "Held-out contexts of 128 tokens to evaluate on.")
    max_norm_ratio: float | None = specs.option(None, "Leave positions whose activation norm exceeds this multiple "
                                                      "of the median out of the metrics (kept clean).")

    def __post_init__(self):
        _check_counts(self, ("contexts",))


def check_eval(inputs: SAEFolders, config: SAEEvalConfig) -> None:
    folder = inputs.one("sae eval")
    load_sae(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"SAE folder {folder} is read-only for this user: {EVAL_FILE} cannot be written there. "
                         "Copy the folder somewhere writable.")


def run_sae_eval(model: Model, inputs: SAEFolders, config: SAEEvalConfig) -> Result:
    """L0, variance explained, CE loss recovered (vs zero ablation), dead/dense latents, shrinkage γ; the result
    is also saved as the folder's eval.json."""
    folder = inputs.one("sae eval")
    sae = load_sae(folder)
    check_fits(sae, model)  # a wrong-width SAE fails before the held-out text is tokenised
    result = evaluate(sae, model, _held_out(model, inputs, config.contexts), max_norm_ratio=config.max_norm_ratio,
                      progress=True)
    result = dataclasses.replace(result, meta={**result.meta, "folder": str(folder)})
    result.save_json(folder / EVAL_FILE)
    return result


# ------------------------------------------------------------------------------------------------ features
@dataclass(frozen=True)
class SAEFeaturesConfig:
    """Options of ``sae-features``."""

    top: int = specs.option(10, "Top-activating contexts per latent.", flags=("--top",))
    latents: int = specs.option(20, "How many latents (the densest live ones).")
    contexts: int = specs.option(64, "Held-out contexts of 128 tokens to search.")
    html: str | None = specs.option(None, "Write the feature dashboards here.", flags=("--html",), output="file")

    def __post_init__(self):
        _check_counts(self, ("top", "latents", "contexts"))


def check_features(inputs: SAEFolders, config: SAEFeaturesConfig) -> None:
    load_sae(inputs.one("sae features"))


def run_sae_features(model: Model, inputs: SAEFolders, config: SAEFeaturesConfig) -> Result:
    """Feature dashboards: top-activating contexts (token marked), density, promoted/suppressed tokens."""
    sae = load_sae(inputs.one("sae features"))
    check_fits(sae, model)  # a wrong-width SAE fails before the held-out text is tokenised
    held = _held_out(model, inputs, config.contexts)
    _, _, _, density = top_activations(sae, model, held[:8], k=1)
    order = density.argsort(descending=True)
    chosen = order[density[order] > 0][:config.latents]
    fallback = torch.arange(min(config.latents, sae.cfg.d_sae))
    report = feature_report(sae, model, held, latents=chosen if chosen.numel() else fallback, k=config.top,
                            progress=True)
    if config.html is not None:
        features_html(report, config.html)
    return report


# ------------------------------------------------------------------------------------------------ compare
@dataclass(frozen=True)
class SAECompareConfig:
    """Options of ``sae-compare``."""

    contexts: int = specs.option(32, "Held-out contexts for SAEs without eval.json.")
    max_norm_ratio: float | None = specs.option(None, "As in `sae eval`, for SAEs without eval.json.")
    png: str | None = specs.option(None, "Write the Pareto plot here.", flags=("--png",), output="file")

    def __post_init__(self):
        _check_counts(self, ("contexts",))


def saved_evaluation(folder: Path) -> Result | None:
    """The folder's eval.json (None when absent, or written by an older version: evaluate again)."""
    path = Path(folder) / EVAL_FILE
    if not path.exists():
        return None
    try:
        res = Result.load(path)
    except ResultFormatError:
        raise InputError(f"{path} is not a readable evaluation result; delete it, or write it again with "
                         f"`lmscope sae eval {folder}`.") from None
    if res.method != "sae_eval":
        raise InputError(f"{path} holds a {res.method!r} result, not an SAE evaluation; delete it, or write it "
                         f"again with `lmscope sae eval {folder}`.")
    return res if list(res.axes[0].labels) == list(METRICS) else None


def check_compare(inputs: SAEFolders, config: SAECompareConfig) -> None:
    for folder in inputs.folders:  # every folder is checked before any evaluation runs
        if saved_evaluation(Path(folder)) is None:
            load_sae(folder)


def run_sae_compare(model: Model, inputs: SAEFolders, config: SAECompareConfig) -> Result:
    """Compare SAEs: L0 against variance explained and CE loss recovered (Pareto plot); SAEs without eval.json
    are evaluated now (and their eval.json written)."""
    check_compare(inputs, config)
    results, held = [], None
    for folder in map(Path, inputs.folders):
        res = saved_evaluation(folder)
        if res is None:
            held = _held_out(model, inputs, config.contexts) if held is None else held
            res = evaluate(load_sae(folder), model, held, max_norm_ratio=config.max_norm_ratio)
            res.save_json(folder / EVAL_FILE)
        results.append(res)
    comp = compare(results, [Path(f).name for f in inputs.folders])
    comp = dataclasses.replace(comp, meta={**comp.meta, "undefined": {
        label: r.meta.get("undefined", {}) for label, r in zip(comp.axes[0].labels, results)}})
    if config.png is not None:
        pareto_png(comp, config.png)
    return comp


specs.register_input("sae", sae_folders_from_json)
specs.register(specs.MethodSpec("sae-eval", "sae", "sae", SAEEvalConfig, run_sae_eval, cli=("sae", "eval"),
                                cli_inputs=("folder", "corpus"), check=check_eval))
specs.register(specs.MethodSpec("sae-features", "sae", "sae", SAEFeaturesConfig, run_sae_features,
                                cli=("sae", "features"), cli_inputs=("folder", "corpus"), check=check_features))
specs.register(specs.MethodSpec("sae-compare", "sae", "sae", SAECompareConfig, run_sae_compare, cli=("sae", "compare"),
                                cli_inputs=("folders", "corpus"), check=check_compare))
