"""Attribution patching (AtP) and AtP*: every node's patching effect from one forward and one backward.

AtP (Nanda 2023; Kramár et al. 2024) replaces each activation patch by its first-order Taylor term.
Denoising (the default, as in activation patching and circuits; :mod:`lmscope.targets`) runs the
corrupted prompts with gradients and the clean ones without:

    ĉ(n) = (n(x_clean) − n(x_corrupt)) · ∂M/∂n |_{x_corrupt}

summed over the node's entries (positions, head width, prompts; M is the mean over prompts, so
scores are mean effects). Noising swaps the roles: ``(n(x_corrupt) − n(x_clean)) · ∂M/∂n |_{x_clean}``.
Values are normalised like activation patching, ĉ / (M_clean − M_corrupt) (0 = no effect; denoising
1 = clean behaviour restored, noising −1 = destroyed; GradDrop magnitudes over |M_clean − M_corrupt|);
the raw estimates are in ``extras["raw"]`` (or pass ``normalise=False``).
Nodes: heads (``attn.z`` of one head at every position), MLP layers (``mlp_out``), neurons
(``mlp.post``), residual positions (``resid_pre`` of one layer at one position), and with AtP* the
per-head query, key and value inputs.

AtP* (Kramár, Lieberum, Shah, Nanda 2024) fixes two failure modes:

* **QK fix.** For a head's query (key) node, the attention scores are recomputed exactly with the
  patched queries (keys), the softmax is applied exactly, and only the step from the pattern to
  the metric is linearised: ``Σ (A' − A) · ∂M/∂A``. Grouped-query heads are ungrouped: the key and
  value nodes of a query head are its own copy of the shared key/value head.
* **GradDrop.** For each layer ℓ the backward pass is repeated with the gradient into the residual
  stream from block ℓ's writes (attention and MLP) set to zero; a node's score is the mean of the
  absolute estimates over the L − 1 layers other than its own (all L for residual nodes). GradDrop
  scores are magnitudes (≥ 0).

Use AtP to rank thousands of nodes in seconds, then check the top ones by exact patching
(:mod:`lmscope.localization.patching`). It is poor for large-norm activations (early residual
stream) and for effects through attention saturation (what the QK fix is for).

Shapes: B prompts, T tokens, L layers, H heads, F neurons. ``atp`` returns a ResultSet (a mapping):
``head`` (L, H), ``mlp`` (L,), ``neuron`` (L, F), ``resid`` (L, T), and with the QK fix
``head_q``/``head_k``/``head_v`` (L, H).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmscope import specs
import torch

from lmscope.errors import InputError, ModelCheckError
from lmscope.localization.metrics import Metric, metric_kind
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Axis, Result, ResultSet
from lmscope.targets import default_metric

NODES = ("head", "mlp", "neuron", "resid")
SITE_OF_NODE = {"head": "attn.z", "mlp": "mlp_out", "neuron": "mlp.post", "resid": "resid_pre"}
DIRECTIONS = ("noise", "denoise")
ALL_NODES = NODES + ("head_q", "head_k", "head_v")


@dataclass(frozen=True)
class AtPConfig:
    """Options of :func:`atp`: which nodes, denoising or noising, AtP* parts, prompts per batch, metric."""

    nodes: tuple[str, ...] = specs.option(NODES, "Node kinds: head | mlp | neuron | resid.")
    direction: str = specs.option("denoise", "Denoise: clean values into the corrupted run (default, as in "
                                             "patching); noise: the reverse.", flags=("--denoise/--noise",),
                                  values=("denoise", "noise"))
    qk_fix: bool = specs.option(False, "AtP*'s QK fix (exact softmax for query and key nodes).")
    graddrop: bool = specs.option(False, "AtP*'s GradDrop (scores become magnitudes).")
    batch_size: int = specs.option(16, "Prompts per forward/backward.")
    metric: str | None = specs.option(None, "logit_diff | probability | log_prob (default: logit_diff with a foil, "
                                            "log_prob without).")
    normalise: bool = specs.option(True, "Divide by M_clean − M_corrupt, as activation patching does (raw values "
                                         "stay in extras['raw']).", flags=("--normalise/--raw",))
    star: bool = specs.option(False, "AtP*: the QK fix and GradDrop together.", flags=("--star",))
    node: str = specs.option("head", "Node kind the command line shows and writes to --json: head | mlp | neuron | "
                                     "resid (with --star also head_q | head_k | head_v).", choices=ALL_NODES)
    exact: bool = specs.option(False, "Also patch every head exactly and set AtP and AtP*'s GradDrop beside it "
                                      "(member 'head_check'; L·H extra patched runs).", flags=("--exact",))

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        if self.star:
            object.__setattr__(self, "qk_fix", True)
            object.__setattr__(self, "graddrop", True)
        specs.check_config(self)
        bad = [n for n in self.nodes if n not in NODES]
        if bad or not self.nodes:
            raise InputError(f"Unknown AtP node kind(s) {bad}; choose from {NODES}.")
        if self.direction not in DIRECTIONS:
            raise InputError(f"direction={self.direction!r}: use 'noise' or 'denoise'.")
        if self.batch_size < 1:
            raise InputError("batch_size must be at least 1.")


def encode_pairs(model: Model, pairs: PromptPairs) -> tuple:
    """Clean and corrupted prompts tokenised together (same padding): (clean Batch, corrupt Batch)."""
    from lmscope.models import Batch

    both = model.encode(list(pairs.clean) + list(pairs.corrupt), padding_side="left")
    b = len(pairs)

    def part(rows: slice) -> Batch:
        return Batch(both.input_ids[rows], both.attention_mask[rows], both.position_ids[rows],
                     both.str_tokens[rows], both.padding_side)

    clean, corrupt = part(slice(0, b)), part(slice(b, 2 * b))
    if not torch.equal(clean.attention_mask, corrupt.attention_mask):
        raise InputError("Clean and corrupted prompts tokenise to different lengths; patching needs aligned "
                         "positions (check with PromptPairs.check(model)).")
    return clean, corrupt


def _sites(model: Model, cfg: AtPConfig, base: bool) -> list[str]:
    n = model.spec.n_layers
    kinds = []
    if "head" in cfg.nodes:
        kinds.append("attn.z")
    if "mlp" in cfg.nodes:
        kinds.append("mlp_out")
    if "neuron" in cfg.nodes:
        kinds.append("mlp.post")
    if "resid" in cfg.nodes:
        kinds.append("resid_pre")
    if cfg.qk_fix:
        kinds += ["attn.q", "attn.k", "attn.v", "attn.pattern"]
    if cfg.graddrop and base:
        kinds += ["attn_out", "mlp_out"]
    return [f"blocks.{l}.{k}" for l in range(n) for k in dict.fromkeys(kinds)]


def _estimates(model: Model, cfg: AtPConfig, base: dict, other: dict, grads: dict,
               real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-node estimates for one batch from activations and gradients (all summed over prompts).
    ``real`` (B, T) marks real (not padding) tokens: padded query rows are left out of the QK fix."""
    n = model.spec.n_layers
    out: dict[str, list] = {}

    def g(name):
        t = grads.get(name)
        return torch.zeros_like(base[name]) if t is None else t

    for layer in range(n):
        pre = f"blocks.{layer}."
        if "head" in cfg.nodes:
            z = pre + "attn.z"
            out.setdefault("head", []).append(((other[z] - base[z]) * g(z)).sum(dim=(0, 1, 3)))
        if "mlp" in cfg.nodes:
            m = pre + "mlp_out"
            out.setdefault("mlp", []).append(((other[m] - base[m]) * g(m)).sum())
        if "neuron" in cfg.nodes:
            p = pre + "mlp.post"
            out.setdefault("neuron", []).append(((other[p] - base[p]) * g(p)).sum(dim=(0, 1)))
        if "resid" in cfg.nodes:
            r = pre + "resid_pre"
            out.setdefault("resid", []).append(((other[r] - base[r]) * g(r)).sum(dim=(0, 2)))
        if cfg.qk_fix:
            q, k, v, a = (pre + s for s in ("attn.q", "attn.k", "attn.v", "attn.pattern"))
            allowed = (base[a] > 0) | (other[a] > 0)

            def pattern(qq, kk):
                scores = model.attention_scores(layer, qq, kk).float()
                return scores.masked_fill(~allowed, float("-inf")).softmax(-1)

            gA = g(a) * real[:, None, :, None].to(base[a].dtype)
            a_q, a_k = pattern(other[q], base[k]), pattern(base[q], other[k])
            out.setdefault("head_q", []).append(((a_q - base[a]) * gA).sum(dim=(0, 2, 3)))
            out.setdefault("head_k", []).append(((a_k - base[a]) * gA).sum(dim=(0, 2, 3)))
            out.setdefault("head_v", []).append(((other[v] - base[v]) * g(v)).sum(dim=(0, 1, 3)))
    return {k: torch.stack(v) for k, v in out.items()}


def _check_patterns(model: Model, base: dict, real: torch.Tensor) -> None:
    """The QK fix recomputes patterns from cached q and k: they must match the model's own."""
    layer = model.spec.n_layers - 1
    pre = f"blocks.{layer}."
    a = base[pre + "attn.pattern"].detach()
    scores = model.attention_scores(layer, base[pre + "attn.q"].detach(), base[pre + "attn.k"].detach())
    rec = scores.float().masked_fill(a <= 0, float("-inf")).softmax(-1)
    err = ((rec - a) * real[:, None, :, None]).abs().max().item()
    if err > 1e-3:
        raise ModelCheckError(
            f"AtP*'s QK fix cannot reproduce {model.name}'s attention patterns from its queries and keys "
            f"(max error {err:.2g}; a score transform the adapter does not name?). Use qk_fix=False for this model.")


def atp(model: Model, pairs: PromptPairs, *, nodes: Sequence[str] = NODES, direction: str = "denoise",
        metric: str | None = None, qk_fix: bool = False, graddrop: bool = False,
        batch_size: int = 16, normalise: bool = True) -> ResultSet:
    """Attribution patching over ``pairs`` (see the module docstring); a ResultSet by node kind.

    ``metric``: "logit_diff" (target − foil; the default with foils), "probability" or "log_prob" (the
    default without foils) of the target.
    """
    cfg = AtPConfig(tuple(nodes), direction, qk_fix, graddrop, batch_size)
    for node in cfg.nodes:
        model.require([SITE_OF_NODE[node]], f"AtP on {node} nodes")
    metric = metric_kind(metric or default_metric(pairs.foils[0]), ("logit_diff", "prob", "logprob"), "AtP")
    pairs.check(model)
    total = len(pairs)
    if "resid" in cfg.nodes and len(set(pairs.lengths(model))) > 1:
        raise InputError("Residual-position nodes need prompts of one token length (positions must align "
                         "across prompts); drop 'resid' from nodes or use prompts of equal length.")
    sums: dict[str, torch.Tensor] = {}
    clean_m = corrupt_m = 0.0
    tokens = None
    for start in range(0, total, cfg.batch_size):
        sub = pairs.subset(range(start, min(total, start + cfg.batch_size)))
        clean, corrupt = encode_pairs(model, sub)
        targets, foils = sub.token_ids(model)
        m = Metric(metric, targets, foils if metric == "logit_diff" else None)
        base_b, other_b = (clean, corrupt) if cfg.direction == "noise" else (corrupt, clean)
        other = model.run(other_b, cache=_sites(model, cfg, False), logits="last")
        run = model.run(base_b, cache=_sites(model, cfg, True), logits="last", grad=True)
        value = m(run.logits)
        weight = len(sub) / total
        base = run.cache
        if cfg.qk_fix and start == 0:
            _check_patterns(model, base, base_b.attention_mask.bool())
        names = [k for k in base if not k.startswith("aux.")]
        grads = dict(zip(names, torch.autograd.grad(value, [base[k] for k in names], retain_graph=cfg.graddrop,
                                                    allow_unused=True)))
        det = {k: v.detach() for k, v in base.items()}
        real = base_b.attention_mask.bool()
        est = _estimates(model, cfg, det, other.cache, grads, real)
        if cfg.graddrop:
            est = _graddrop(model, cfg, value, base, det, other.cache, names, real)
        for k, v in est.items():
            sums[k] = sums.get(k, 0) + v.detach() * weight
        with torch.no_grad():
            o_val = m(other.logits)
        v_clean, v_corrupt = (value, o_val) if cfg.direction == "noise" else (o_val, value)
        clean_m += float(v_clean.detach()) * weight
        corrupt_m += float(v_corrupt.detach()) * weight
        if tokens is None:
            tokens = clean.str_tokens[0]
        del run, base, grads
    return _results(model, cfg, sums, pairs, tokens, metric, clean_m, corrupt_m, normalise)


def atp_star(model: Model, pairs: PromptPairs, **kwargs) -> ResultSet:
    """AtP* = AtP with the QK fix and GradDrop (see the module docstring)."""
    return atp(model, pairs, qk_fix=True, graddrop=True, **kwargs)


def _graddrop(model: Model, cfg: AtPConfig, value, base, det, other, names, real) -> dict[str, torch.Tensor]:
    n = model.spec.n_layers
    acc: dict[str, torch.Tensor] = {}
    for drop in range(n):
        hooks = [base[f"blocks.{drop}.{k}"].register_hook(torch.zeros_like) for k in ("attn_out", "mlp_out")]
        try:
            grads = torch.autograd.grad(value, [base[k] for k in names], retain_graph=True, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        est = _estimates(model, cfg, det, other, dict(zip(names, grads)), real)
        for k, v in est.items():
            keep = torch.ones(n, dtype=torch.bool)
            if k != "resid":
                keep[drop] = False  # a node's own layer is left out
            shape = (n,) + (1,) * (v.ndim - 1)
            acc[k] = acc.get(k, 0) + v.abs() * keep.view(shape).to(v)
    return {k: v / (n if k == "resid" else max(n - 1, 1)) for k, v in acc.items()}


def _results(model, cfg, sums, pairs, tokens, metric, clean_m, corrupt_m, normalise) -> ResultSet:
    s = model.spec
    layers = Axis("layer", tuple(range(s.n_layers)))
    heads = Axis("head", tuple(range(s.n_heads)))
    method = "atp*" if (cfg.qk_fix or cfg.graddrop) else "atp"
    params = {"direction": cfg.direction, "qk_fix": cfg.qk_fix, "graddrop": cfg.graddrop, "n_prompts": len(pairs),
              "metric": metric, "normalise": normalise}
    gap = clean_m - corrupt_m
    if normalise and abs(gap) < 1e-6:
        raise InputError("The clean and corrupted runs give the same metric value, so normalised AtP scores are "
                         "undefined. Check that the corruption changes the answer, or pass normalise=False.")
    scale = (abs(gap) if cfg.graddrop else gap) if normalise else 1.0
    meta = {"clean_metric": clean_m, "corrupt_metric": corrupt_m, "prompt": pairs.clean[0],
            "corrupt_prompt": pairs.corrupt[0], "task": pairs.meta.get("task")}
    target = {"target": pairs.targets[0], "foil": pairs.foils[0]}
    out = {}
    for kind, vals in sums.items():
        if kind in ("head", "head_q", "head_k", "head_v"):
            axes = (layers, heads)
        elif kind == "mlp":
            axes = (layers,)
        elif kind == "neuron":
            axes = (layers, Axis("neuron", tuple(range(s.d_mlp))))
        else:
            labels = tuple(f"{i}:{t}" for i, t in enumerate(tokens))
            axes = (layers, Axis("position", labels))
        raw = vals.float()
        out[kind] = Result(raw / scale, axes, method, model.name, target, {**params, "node": kind},
                           {"raw": raw}, meta)
    return ResultSet(out, method, model.name, meta)


def exact_head_effects(model: Model, pairs: PromptPairs, *, direction: str = "denoise", metric: str = "logit_diff",
                       batch_size: int = 16, chunk_size: int | None = None) -> Result:
    """The exact counterpart of AtP's ``head`` nodes, to validate it: M(patched) − M(base) for each
    head, its ``attn.z`` patched at every position (denoising: clean values into the corrupted run),
    through batched runs (:meth:`Model.run_sets`). (L, H) Result."""
    from lmscope.interventions import Patch

    if direction not in DIRECTIONS:
        raise InputError(f"direction={direction!r}: use 'noise' or 'denoise'.")
    s = model.spec
    total = len(pairs)
    effects = torch.zeros(s.n_layers, s.n_heads)
    sites = [f"blocks.{l}.attn.z" for l in range(s.n_layers)]
    for start in range(0, total, batch_size):
        sub = pairs.subset(range(start, min(total, start + batch_size)))
        clean, corrupt = encode_pairs(model, sub)
        base_b, other_b = (clean, corrupt) if direction == "noise" else (corrupt, clean)
        targets, foils = sub.token_ids(model)
        m = Metric(metric, targets, foils if metric == "logit_diff" else None)
        with torch.no_grad():
            base = model.run(base_b, logits="last")
            other = model.run(other_b, cache=sites, logits="none")
            sets = [[Patch(site, value=other[site], heads=[h])] for site in sites for h in range(s.n_heads)]
            patched = model.run_sets(base_b, sets, logits="last", chunk_size=chunk_size).logits
        eff = m(patched) - m(base.logits)
        effects += eff.view(s.n_layers, s.n_heads) * len(sub) / total
    return Result(effects, (Axis("layer", tuple(range(s.n_layers))), Axis("head", tuple(range(s.n_heads)))),
                  "head_patching", model.name, {"target": pairs.targets[0], "foil": pairs.foils[0]},
                  {"direction": direction, "metric": metric, "n_prompts": total})


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten().double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in x.unique():  # average the ranks of ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ------------------------------------------------------------------------------------------------ spec
def run_atp(model: Model, pairs: PromptPairs, config: AtPConfig) -> ResultSet:
    """Attribution patching (AtP / AtP*): every head, MLP, neuron and residual position at once."""
    nodes = config.nodes
    if config.nodes == NODES and len(set(pairs.lengths(model))) > 1:
        nodes = tuple(k for k in NODES if k != "resid")  # positions do not align across prompts
    res = atp(model, pairs, nodes=nodes, direction=config.direction, metric=config.metric, qk_fix=config.qk_fix,
              graddrop=config.graddrop, batch_size=config.batch_size, normalise=config.normalise)
    if not config.exact:
        return res
    from lmscope.localization.atp_check import head_check

    check = head_check(model, pairs, direction=config.direction, metric=config.metric, batch_size=config.batch_size)
    return ResultSet({**res.results, "head_check": check}, res.method, res.model, res.meta)


specs.register(specs.MethodSpec("atp", "localization", "pairs", AtPConfig, run_atp, "resultset",
                                sites=("attn.z", "attn.q", "attn.k", "attn.pattern", "mlp_out", "mlp.post",
                                       "resid_pre")))
