"""Activation patching: which activations carry the information that separates two inputs.

Take clean prompts (the behaviour is present) and corrupted prompts of the same token length (it is
not), and a metric (logit difference by default). **Denoising** runs the corrupted prompts and writes
one clean activation in (is this component sufficient to restore the behaviour?); **noising** runs
the clean prompts and writes one corrupted activation in (is it necessary?). Both answers differ for
AND/OR-structured circuits, so report both (Heimersheim & Nanda 2024; Zhang & Nanda 2024; METHODS.md §5.1).

Every sweep is a few batched forwards through :meth:`lmscope.models.Model.run_sets`, which shares the
blocks below each patched layer and, for position-restricted patches, the keys/values of the
positions before the patched one (see :mod:`lmscope.models.reuse`). Each cell equals a separate
patched forward.

Public API (stable; other method families import it)::

    SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
             "z", "q", "k", "v", "pattern", "head_out")        # short names; per-head: z q k v pattern head_out
    prepare(model, pairs, metric="logit_diff") -> Setup   # batches, metric, clean/corrupt values
    Setup.base(direction) -> Batch;  Setup.normalise(values, direction)
    patched_values(model, setup, sets, direction="denoise", chunk_size=None) -> (N,) metric per set
    source_values(model, setup, site_names, source, direction, reference=None) -> {site: tensor}
    activation_patching(model, pairs, site="resid_pre", *, direction="denoise", source=None,
                        metric="logit_diff", by_position=None, layers=None, positions=None,
                        heads=None, normalise=True, reference=None, chunk_size=None) -> Result

``activation_patching`` returns axes (layer, position) for residual and block-output sites,
(layer, head) for per-head sites, and (layer, head, position) for per-head sites with
``by_position=True``. ``source``: "clean" (default when denoising), "corrupt" (default when noising),
"zeros", or "mean" (the mean over ``reference`` prompts, default the clean and corrupted prompts
together; all must have the same token length). For ``pattern`` the position axis is the query
position. Values are normalised (denoising 0 → 1, noising 0 → −1) unless ``normalise=False``; the raw
metric is in ``extras["raw"]`` and the unpatched values in ``meta``.
"""

from __future__ import annotations

from lmscope import specs
from lmscope.targets import DIRECTIONS, default_metric
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.errors import InputError, SiteError
from lmscope.interventions import Ablate, Intervention, Patch
from lmscope.localization.metrics import Metric, metric_kind, normalise as _normalise
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Batch, Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_heads, resolve_layers, resolve_positions

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "head_out",
         "ssm_out", "ssm.out", "ssm.gate", "ssm.conv", "ssm.y",  # the ssm sites: state-space models (Mamba)
         "wkv_out", "wkv.out", "wkv.r", "wkv.k", "wkv.v", "wkv.y")  # the wkv sites: RWKV's time mix
_KIND = {"z": "attn.z", "q": "attn.q", "k": "attn.k", "v": "attn.v", "pattern": "attn.pattern",
         "head_out": "attn.head_out"}
SOURCES = ("clean", "corrupt", "zeros", "mean")


@dataclass
class Setup:
    """Everything a patching experiment needs once: the two batches, the metric and its baselines.

    ``clean_logits``/``corrupt_logits`` are the answer-position logits (B, V); ``clean_value`` and
    ``corrupt_value`` the metric (mean over prompts) on the unpatched runs.
    """

    pairs: PromptPairs
    clean: Batch
    corrupt: Batch
    metric: Metric
    clean_logits: torch.Tensor
    corrupt_logits: torch.Tensor
    clean_value: float
    corrupt_value: float

    def base(self, direction: str) -> Batch:
        """The batch that is run: the corrupted prompts when denoising, the clean ones when noising."""
        _check_direction(direction)
        return self.corrupt if direction == "denoise" else self.clean

    def normalise(self, values: torch.Tensor, direction: str) -> torch.Tensor:
        return _normalise(values, self.clean_value, self.corrupt_value, direction)


def _check_direction(direction: str) -> None:
    if direction not in ("denoise", "noise"):
        raise InputError(f"direction={direction!r}: use 'denoise' (clean into corrupted) or 'noise'.")


def prepare(model: Model, pairs: PromptPairs, metric: str = "logit_diff") -> Setup:
    """Check the pairs (equal token lengths, single-token answers), run both sides once, build the metric."""
    metric = metric_kind(metric)
    pairs.check(model)
    clean, corrupt = model.encode(pairs.clean), model.encode(pairs.corrupt)
    if clean.input_ids.shape != corrupt.input_ids.shape or not torch.equal(clean.attention_mask,
                                                                            corrupt.attention_mask):
        raise InputError("Clean and corrupted prompts do not align after padding; every pair must have the same "
                         "token length.")
    targets, foils = pairs.token_ids(model)
    with torch.no_grad():
        cl = model.run(clean, logits="last").logits
        cr = model.run(corrupt, logits="last").logits
    m = Metric(metric, targets, foils, cl if metric == "kl" else None)
    return Setup(pairs, clean, corrupt, m, cl, cr, float(m(cl)), float(m(cr)))


def patched_values(model: Model, setup: Setup, sets: Sequence[Sequence[Intervention]], direction: str = "denoise",
                   chunk_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """The metric (mean over prompts) for each intervention set applied to the base run: (N,)."""
    out = model.run_sets(setup.base(direction), sets, logits="last", chunk_size=chunk_size, progress=progress)
    return setup.metric(out.logits)


def _site_kind(model: Model, site: str) -> str:
    if site not in SITES:
        raise SiteError(f"Patching site {site!r} is not supported; use one of {', '.join(SITES)}.")
    if site == "resid_mid" and model.spec.parallel:
        raise SiteError(f"{model.name} runs attention and MLP in parallel, so it has no resid_mid; use resid_pre, "
                        "attn_out or mlp_out.")
    return _KIND.get(site, site)


def source_values(model: Model, setup: Setup, names: Sequence[str], source: str, direction: str,
                  reference: Sequence[str] | None = None) -> dict[str, torch.Tensor] | None:
    """Values written into the base run per site name; ``None`` for ``source="zeros"`` (zero ablation)."""
    if source not in SOURCES:
        raise InputError(f"source={source!r}: use one of {SOURCES}.")
    if source == "zeros":
        return None
    if source in ("clean", "corrupt"):
        batch = setup.clean if source == "clean" else setup.corrupt
        with torch.no_grad():
            return model.run(batch, cache=names, logits="none").cache
    prompts = list(reference) if reference is not None else setup.pairs.clean + setup.pairs.corrupt
    ref = model.encode(prompts)
    if not bool(ref.attention_mask.all()) or ref.input_ids.shape[1] != setup.clean.input_ids.shape[1]:
        lengths = sorted(set(ref.lengths.tolist()))
        raise InputError(f"Mean patching needs reference prompts of the base prompts' length "
                         f"({setup.clean.input_ids.shape[1]} tokens); got lengths {lengths}.")
    with torch.no_grad():
        cache = model.run(ref, cache=names, logits="none").cache
    return {k: v.mean(0, keepdim=True) for k, v in cache.items()}


def _labels(model: Model, batch: Batch) -> tuple[str, ...]:
    return tuple(f"{i}:{tok}" for i, tok in enumerate(batch.str_tokens[0]))


def activation_patching(model: Model, pairs: PromptPairs, site: str = "resid_pre", *, direction: str = "denoise",
                        source: str | None = None, metric: str = "logit_diff", by_position: bool | None = None,
                        layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                        heads: Sequence[int] | None = None, normalise: bool = True,
                        reference: Sequence[str] | None = None, chunk_size: int | None = None,
                        progress: bool = False, setup: Setup | None = None) -> Result:
    """Patch ``site`` one cell at a time (layer × position, layer × head, or layer × head × position).

    Returns a :class:`Result` (see the module docstring for axes); ``values[c]`` is the normalised
    metric of the base run with cell c patched from ``source``.
    """
    _check_direction(direction)
    kind = _site_kind(model, site)
    per_head = kind.startswith("attn.")
    by_position = (not per_head) if by_position is None else by_position
    if not per_head and not by_position:
        raise InputError(f"Site {site} has no head axis; sweep it by position (by_position=True).")
    source = source or ("clean" if direction == "denoise" else "corrupt")
    setup = setup or prepare(model, pairs, metric)
    base = setup.base(direction)
    t = base.input_ids.shape[1]
    if by_position and not bool(base.attention_mask.all()):
        raise InputError("A sweep over positions needs prompts of one token length (positions must mean the same "
                         f"thing in every prompt); these have lengths {sorted(set(base.lengths.tolist()))}. "
                         "Use prompts from one template (tasks.ioi does this) or sweep heads only.")
    n_layers = model.spec.n_layers
    layers = resolve_layers(layers, n_layers)
    positions = resolve_positions(positions, t)
    heads = resolve_heads(heads, model.spec.n_heads)
    names = [f"blocks.{layer}.{kind}" for layer in layers]
    values = source_values(model, setup, names, source, direction, reference)

    def iv(name, **where):
        if values is None:
            return Ablate(name, mode="zero", **where)
        return Patch(name, value=values[name], **where)

    sets, shape = [], [len(layers)]
    if per_head:
        shape.append(len(heads))
    if by_position:
        shape.append(len(positions))
    for name in names:
        for h in heads if per_head else [None]:
            for p in positions if by_position else [None]:
                where = {}
                if h is not None:
                    where["heads"] = [h]
                if p is not None:
                    where["positions"] = [p]
                sets.append([iv(name, **where)])
    raw = patched_values(model, setup, sets, direction, chunk_size, progress).reshape(shape)
    vals = setup.normalise(raw, direction) if normalise else raw
    axes = [Axis("layer", tuple(layers))]
    if per_head:
        axes.append(Axis("head", tuple(heads)))
    if by_position:
        labels = _labels(model, base)
        axes.append(Axis("position", tuple(labels[p] for p in positions)))
    return Result(
        vals.float().cpu(), axes=tuple(axes), method=f"activation_patching.{direction}", model=model.name,
        target={"targets": list(pairs.targets[:5]), "foils": list(pairs.foils[:5]), "metric": metric},
        params={"site": site, "direction": direction, "source": source, "metric": metric, "normalise": normalise,
                "n_prompts": len(pairs)},
        extras={"raw": raw.float().cpu()},
        meta={"clean_metric": setup.clean_value, "corrupt_metric": setup.corrupt_value,
              "clean": pairs.clean[0], "corrupt": pairs.corrupt[0], "positions": positions},
    )


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class PatchConfig:
    """Activation patching sweep over one site kind (conventions of :mod:`lmscope.targets`)."""

    site: str = specs.option("resid_pre", "resid_pre | resid_mid | resid_post | attn_out | mlp_out | z (per head) | "
                                          "q | k | v | pattern | head_out; Mamba: ssm_out | ssm.out | ssm.gate | "
                                          "ssm.conv | ssm.y; RWKV: wkv_out | wkv.out | wkv.r | wkv.k | wkv.v | wkv.y",
                                  choices=SITES)
    direction: str = specs.option("denoise", "Denoise: clean values into the corrupted run (default); noise: the "
                                             "reverse.", choices=DIRECTIONS, flags=("--denoise/--noise",),
                                  values=DIRECTIONS)
    source: str | None = specs.option(None, "clean | corrupt | zeros | mean (default: the other run).", choices=SOURCES)
    by_position: bool = specs.option(False, "For per-head sites: layer × head × position.", flags=("--by-position",))
    metric: str | None = specs.option(None, "logit_diff | probability | log_prob | kl (default: logit_diff with a "
                                            "foil, log_prob without).")
    normalise: bool = specs.option(True, "Normalise: 0 = corrupted run, 1 = clean run.",
                                   flags=("--normalise/--raw",))

    def __post_init__(self):
        specs.check_config(self)


def run_patch(model: Model, pairs: PromptPairs, config: PatchConfig) -> Result:
    """Activation patching sweep: layer × position (residual/block sites) or layer × head (z, q, k, v, ...)."""
    per_head = config.site in ("z", "q", "k", "v", "pattern", "head_out")
    metric = config.metric or default_metric(pairs.foils[0])
    return activation_patching(model, pairs, config.site, direction=config.direction, source=config.source,
                               metric=metric, by_position=True if not per_head else config.by_position,
                               normalise=config.normalise, progress=True)


specs.register(specs.MethodSpec("patch", "localization", "pairs", PatchConfig, run_patch,
                                sites=("resid_pre", "attn.z"), cli_inputs=("clean", "corrupt", "target", "foil")))
