"""Linear probes with cross-validation, control tasks and selectivity (Hewitt & Liang, EMNLP 2019).

A probe asks whether a property of the input (sentiment, part of speech, ...) can be read off a
frozen activation by a linear map. Activations are collected once per text at one site and layer
(:func:`collect`), at a chosen token: the last token, the mean over the text's tokens, a token
marked in the text with ``[[...]]`` (its last token is read), an index, or every token
(``"tokens"``: each token is one example, labelled with its text's label). Probes then train on the
cached ``(N, D)`` tensors:

* ``logistic``: multinomial logistic regression with an L2 penalty (L-BFGS on standardised features);
* ``ridge``: least squares on one-hot targets with an L2 penalty (closed form), predicting the argmax;
* ``mean_diff``: the mass-mean probe (difference of class means, binary only).

Accuracy is the mean held-out accuracy over k stratified folds; with ``position="tokens"`` the folds
split texts, not tokens (all tokens of a text are held out together). The *control task* gives every
word type (the token read; the text itself for ``position="mean"``) a fixed random label drawn from
the empirical label distribution; it can only be solved by memorising types. Selectivity = task
accuracy − control accuracy. :func:`probe_layers` returns both per layer as a :class:`Result`.

A control task is only informative when held-out examples share types with training examples. With
``"mean"`` every text is its own type, so the control accuracy is chance by construction and
selectivity says nothing; with ``"tokens"`` word types recur across texts, and a probe that reads
token identity scores above chance on the control task (Hewitt & Liang's setting: one example per
word, labels per word type).

Shapes: X (N, D), y (N,) class indices; a fitted probe has ``weight`` (K, D) and ``bias`` (K,) in the
original (unstandardised) activation space, so ``X @ weight.T + bias`` are its logits.
"""

from __future__ import annotations

from lmscope import specs
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope import sites
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import parse_site

MARK = re.compile(r"\[\[(.+?)\]\]", re.S)
PROBE_KINDS = ("logistic", "ridge", "mean_diff")
POSITIONS = ("last", "mean", "marked", "tokens")
Position = str | int


# ----------------------------------------------------------------------------------- activations
def _strip_marks(text: str) -> tuple[str, int | None]:
    """The text without ``[[``/``]]`` and the character offset where the (last) marked span ends."""
    end, out, last = None, [], 0
    for m in MARK.finditer(text):
        out.append(text[last:m.start()])
        out.append(m.group(1))
        end = sum(map(len, out))
        last = m.end()
    out.append(text[last:])
    return "".join(out), end


def _site_names(model: Model, site: str, layers: Sequence[int]) -> list[str]:
    kind = parse_site(f"blocks.0.{site}").kind if not site.startswith("blocks.") else parse_site(site).kind
    if kind == "attn.pattern":
        raise InputError("Probes read per-token vectors; attn.pattern has no per-token vector. Use attn.z, "
                         "resid_post or another site.")
    return [parse_site(f"blocks.{l}.{kind}", model.spec.n_layers).name for l in layers]


def resolve_layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    """Layers as non-negative indices (negatives count from the end); all layers when None."""
    return sites.resolve_layers(layers, model.spec.n_layers)


def collect(model: Model, texts: Sequence[str], site: str = "resid_post", layers: Sequence[int] | None = None, *,
            position: Position = "last", batch_size: int = 16) -> tuple[dict[int, torch.Tensor], list]:
    """Activations (N, D') of ``texts`` at ``site`` (a kind such as ``resid_post`` or ``attn.z``) per layer.

    ``position``: "last", "mean" (over the text's tokens), "marked" (the last token of the ``[[...]]``
    span), "tokens" (every token: N is the total token count, text by text; :func:`token_groups` gives
    each row's text) or an int index into each text's tokens (negative from the end). Per-head sites
    are flattened to H*dh. Returns ({layer: (N, D') float32}, types), where ``types`` are the
    control-task word types: the token id read (a tuple of the text's ids for "mean").
    """
    layers = resolve_layers(model, layers)
    names = _site_names(model, site, layers)
    texts = list(texts)
    if not texts:
        raise InputError("No texts to collect activations from.")
    if not (position in POSITIONS or isinstance(position, int)):
        raise InputError(f"position={position!r}: use 'last', 'mean', 'marked', 'tokens' or a token index.")
    clean, ends = zip(*(_strip_marks(t) for t in texts))
    if position == "marked":
        missing = [i for i, e in enumerate(ends) if e is None]
        if missing:
            raise InputError(f"position='marked' but text {missing[0]} ({texts[missing[0]][:50]!r}) has no "
                             "[[...]] mark; mark the token to read, e.g. 'The [[cat]] sat'.")
    parts: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    types: list = []
    for start in range(0, len(texts), batch_size):
        chunk = list(clean[start:start + batch_size])
        batch = model.encode(chunk, padding_side="right")
        idx = _read_index(model, batch, chunk, ends[start:start + batch_size], position)
        with torch.no_grad():
            run = model.run(batch, cache=names, logits="none", padding_side="right")
        rows = torch.arange(len(chunk))
        mask = batch.attention_mask.bool()
        for l, name in zip(layers, names):
            acts = run[name].float()
            acts = acts.reshape(*acts.shape[:2], -1)
            if position == "mean":
                m = mask.unsqueeze(-1).to(acts)
                parts[l].append((acts * m).sum(1) / m.sum(1))
            elif position == "tokens":
                parts[l].append(acts[mask])  # (tokens of the chunk, D'), text by text
            else:
                parts[l].append(acts[rows, idx])
        for r in range(len(chunk)):
            ids = batch.input_ids[r][mask[r]].tolist()
            if position == "tokens":
                types += ids
            else:
                types.append(tuple(ids) if position == "mean" else batch.input_ids[r, idx[r]].item())
    return {l: torch.cat(p) for l, p in parts.items()}, types


def token_groups(model: Model, texts: Sequence[str]) -> torch.Tensor:
    """(N tokens,) the text index of each row that ``collect(..., position="tokens")`` returns."""
    lengths = [len(model.encode(_strip_marks(t)[0]).input_ids[0]) for t in texts]
    return torch.repeat_interleave(torch.arange(len(texts)), torch.tensor(lengths))


def _read_index(model: Model, batch, texts, ends, position) -> torch.Tensor:
    lengths = batch.lengths
    if position in ("last", "mean", "tokens"):
        return lengths - 1
    if position == "marked":
        idx = []
        for text, end in zip(texts, ends):
            offsets = model.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
            inside = [i for i, (s, _) in enumerate(offsets) if s < end]
            idx.append(inside[-1])
        return torch.tensor(idx)
    out = []
    for r, n in enumerate(lengths.tolist()):
        if not -n <= position < n:
            raise InputError(f"Token position {position} is out of range for text {r} ({n} tokens).")
        out.append(position % n)
    return torch.tensor(out)


# ----------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class ProbeConfig:
    """How to fit and evaluate a probe. ``l2`` is the penalty weight (per example, on standardised
    features for logistic/ridge); ``folds`` the number of cross-validation folds."""

    kind: str = "logistic"
    l2: float = 1e-3
    folds: int = 5
    seed: int = 0
    max_iter: int = 200

    def __post_init__(self):
        if self.kind not in PROBE_KINDS:
            raise InputError(f"Probe kind {self.kind!r} is unknown; use one of {PROBE_KINDS}.")
        if self.l2 < 0:
            raise InputError(f"l2={self.l2} must be ≥ 0.")
        if self.folds < 2:
            raise InputError(f"folds={self.folds}: cross-validation needs at least 2 folds.")


@dataclass(frozen=True)
class Probe:
    """A fitted linear probe: logits = X @ weight.T + bias; weight (K, D), bias (K,)."""

    weight: torch.Tensor
    bias: torch.Tensor
    kind: str

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        return X.float() @ self.weight.T + self.bias

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.logits(X).argmax(-1)

    def accuracy(self, X: torch.Tensor, y: torch.Tensor) -> float:
        return (self.predict(X) == y).float().mean().item()

    @property
    def direction(self) -> torch.Tensor:
        """Unit (D,) direction separating class 1 from class 0 (binary probes)."""
        d = self.weight[1] - self.weight[0]
        return d / d.norm().clamp_min(1e-12)


def _check_xy(X: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise InputError(f"A probe needs X (N, D) and y (N,); got {tuple(X.shape)} and {tuple(y.shape)}.")
    y = y.long()
    k = int(y.max()) + 1 if len(y) else 0
    if len(torch.unique(y)) < 2:
        raise InputError("All examples have the same label; a probe needs at least two classes.")
    return X.float(), y, k


def fit_probe(X: torch.Tensor, y: torch.Tensor, config: ProbeConfig = ProbeConfig()) -> Probe:
    """Fit one probe on X (N, D), y (N,) class indices 0..K-1."""
    X, y, k = _check_xy(X, y)
    if config.kind == "mean_diff":
        if k != 2:
            raise InputError("The mean_diff probe is binary; use logistic or ridge for more classes.")
        m0, m1 = X[y == 0].mean(0), X[y == 1].mean(0)
        d = m1 - m0
        b = -(d @ (m0 + m1) / 2)
        return Probe(torch.stack([-d / 2, d / 2]), torch.stack([-b / 2, b / 2]), "mean_diff")
    mu, sd = X.mean(0), X.std(0, unbiased=False).clamp_min(1e-6)  # standardise for ridge and logistic
    Z = (X - mu) / sd
    if config.kind == "ridge":
        Y = torch.nn.functional.one_hot(y, k).double()
        Zd = Z.double()
        ym = Y.mean(0)
        A = Zd.T @ Zd + config.l2 * len(y) * torch.eye(Z.shape[1], dtype=torch.float64)
        W = torch.linalg.solve(A, Zd.T @ (Y - ym)).float()  # (D, K)
        b = ym.float()
    else:
        W, b = _logistic(Z, y, k, config)
    weight = (W / sd[:, None]).T.contiguous()
    bias = b - (mu / sd) @ W
    return Probe(weight, bias, config.kind)


def _logistic(Z: torch.Tensor, y: torch.Tensor, k: int, config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    W = torch.zeros(Z.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=config.max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W + b, y) + 0.5 * config.l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def folds_of(y: torch.Tensor, folds: int, seed: int = 0, groups: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) fold index per example, stratified by class, from a seeded permutation. With ``groups``
    (N,) the groups (e.g. texts) are assigned to folds, stratified by each group's first label, and
    every example takes its group's fold."""
    if groups is not None:
        groups = torch.as_tensor(groups).long()
        if groups.shape != y.shape:
            raise InputError(f"groups has shape {tuple(groups.shape)} but the labels {tuple(y.shape)}.")
        ids, inverse = torch.unique(groups, return_inverse=True)
        first = torch.full((len(ids),), len(y)).scatter_reduce(0, inverse, torch.arange(len(y)), reduce="amin")
        return folds_of(y.long()[first], folds, seed)[inverse]
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def cross_validate(X: torch.Tensor, y: torch.Tensor, config: ProbeConfig = ProbeConfig(),
                   groups: torch.Tensor | None = None) -> dict:
    """Held-out accuracy per fold (probe fit on the other folds), its mean and std, and train accuracy.
    With ``groups`` (N,), the examples of a group are held out together (:func:`folds_of`)."""
    X, y, _ = _check_xy(X, y)
    n_units = len(y) if groups is None else len(torch.unique(torch.as_tensor(groups)))
    if n_units < 2 * config.folds:
        raise InputError(f"{n_units} examples (or groups) are too few for {config.folds}-fold cross-validation.")
    fold = folds_of(y, config.folds, config.seed, groups)
    accs, train = [], []
    for f in range(config.folds):
        tr, te = fold != f, fold == f
        if len(torch.unique(y[tr])) < 2:
            raise InputError("A training fold has a single class; give more examples of every class.")
        probe = fit_probe(X[tr], y[tr], config)
        accs.append(probe.accuracy(X[te], y[te]))
        train.append(probe.accuracy(X[tr], y[tr]))
    t = torch.tensor(accs)
    return {"accuracy": t.mean().item(), "std": t.std(unbiased=False).item(), "folds": accs,
            "train_accuracy": sum(train) / len(train)}


def control_labels(types: Sequence, y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Hewitt & Liang control task: each distinct type gets a fixed label drawn from y's distribution."""
    if len(types) != len(y):
        raise InputError(f"{len(types)} types for {len(y)} labels.")
    g = torch.Generator().manual_seed(seed + 1)
    freq = torch.bincount(y.long()).float()
    distinct = list(dict.fromkeys(types))
    drawn = torch.multinomial(freq / freq.sum(), len(distinct), replacement=True, generator=g)
    table = dict(zip(distinct, drawn.tolist()))
    return torch.tensor([table[t] for t in types])


def probe_layers(model: Model, texts: Sequence[str], y: torch.Tensor | Sequence[int], *, site: str = "resid_post",
                 layers: Sequence[int] | None = None, position: Position = "last",
                 config: ProbeConfig = ProbeConfig(), control: bool = True, batch_size: int = 16,
                 classes: Sequence[str] | None = None) -> Result:
    """Cross-validated probe accuracy per layer, with control-task accuracy and selectivity.

    values (layer, metric) with metrics accuracy, control_accuracy, selectivity (control NaN when
    ``control=False``); extras ``accuracy_std`` and ``train_accuracy`` (layer,).
    """
    y = torch.as_tensor(y).long()
    if len(y) != len(texts):
        raise InputError(f"{len(texts)} texts but {len(y)} labels.")
    acts, types = collect(model, texts, site, layers, position=position, batch_size=batch_size)
    groups = None
    if position == "tokens":  # one example per token, labelled with its text's label; folds split texts
        groups = token_groups(model, texts)
        y = y[groups]
    ctrl_y = control_labels(types, y, config.seed) if control else None
    rows, std, train = [], [], []
    for l, X in acts.items():
        cv = cross_validate(X, y, config, groups)
        c = cross_validate(X, ctrl_y, config, groups)["accuracy"] if control and len(torch.unique(ctrl_y)) > 1 \
            else math.nan
        rows.append([cv["accuracy"], c, cv["accuracy"] - c])
        std.append(cv["std"])
        train.append(cv["train_accuracy"])
    layer_labels = tuple(str(l) for l in acts)
    counts = torch.bincount(y).tolist()
    return Result(torch.tensor(rows), (Axis("layer", layer_labels),
                                       Axis("metric", ("accuracy", "control_accuracy", "selectivity"))),
                  "probe", model.name, None,
                  {"site": site, "position": position, "kind": config.kind, "l2": config.l2,
                   "folds": config.folds, "seed": config.seed, "n": len(y), "texts": len(texts)},
                  {"accuracy_std": torch.tensor(std), "train_accuracy": torch.tensor(train)},
                  {"classes": list(classes) if classes is not None else [str(i) for i in range(len(counts))],
                   "class_counts": counts, "majority_baseline": max(counts) / len(y),
                   "n_control_types": len(set(types))})


# ------------------------------------------------------------------------------------------------ spec
def layer_list(text: str | None) -> list[int] | None:
    """'0,5,10', '0-10' (inclusive), '0:30:5' (Python range) or None/'all' for all layers."""
    if text is None or text.strip() in ("", "all"):
        return None
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                layers += list(range(*[int(x) for x in part.split(":")]))
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = part.split("-")
                layers += list(range(int(a), int(b) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise InputError(f"Cannot read layers {text!r}: use '0,5,10', '0-10' or '0:30:5'.") from None
    return layers


@dataclass(frozen=True)
class ProbeRunConfig:
    """Linear probes per layer on a labelled set."""

    site: str = specs.option("resid_post", "Site kind: resid_pre, resid_post, mlp_out, attn.z, ...")
    layers: str | None = specs.option(None, "Layers: '0,5,10', '0-10' or '0:30:5' (default: all).")
    position: str = specs.option("last", "last | mean | marked ([[...]] in the text) | tokens (every token, with "
                                         "its text's label; folds split texts) | an index.")
    kind: str = specs.option("logistic", "logistic | ridge | mean_diff", choices=PROBE_KINDS)
    folds: int = specs.option(5, "Cross-validation folds.")
    l2: float = specs.option(1e-3, "L2 penalty.")
    control: bool = specs.option(True, "Also run the control task (selectivity).", flags=("--control/--no-control",))

    def __post_init__(self):
        specs.check_config(self)
        layer_list(self.layers)
        ProbeConfig(kind=self.kind, l2=self.l2, folds=self.folds)


def run_probe(model: Model, data, config: ProbeRunConfig) -> Result:
    """Linear probes per layer with cross-validation, a control task and selectivity."""
    pos: Position = int(config.position) if config.position.lstrip("-").isdigit() else config.position
    result = probe_layers(model, data.texts, data.y, site=config.site, layers=layer_list(config.layers), position=pos,
                          config=ProbeConfig(kind=config.kind, l2=config.l2, folds=config.folds),
                          control=config.control, classes=data.classes)
    result.meta.update(dataset=data.name, n_examples=len(data.texts))
    return result


specs.register(specs.MethodSpec("probe", "decoding", "labelled", ProbeRunConfig, run_probe, sites=("resid_post",)))
