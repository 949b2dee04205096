"""Neuron analysis: what makes an MLP neuron fire, what it writes, and which concepts it tracks.

* **Top-activating contexts** (the classic dataset-example view, e.g. Bills et al. 2023): stream a corpus
  through the model in batches and keep, per neuron of one layer, the k largest activations (``mlp.post``,
  the input of the down projection) with a window of tokens around each. Memory is bounded by
  ``neurons × k × window`` whatever the corpus size: each batch is merged into a running top-k.
* **Vocabulary projection** of a neuron's output weights (Geva et al. 2022): its row of the down
  projection, through the final norm's gain and the unembedding: the tokens it promotes and suppresses.
* **Concept neurons** from a labelled set (e.g. Gurnee et al. 2023 use single-neuron probes): each neuron's
  mean activation over the tokens of a text, and per class the standardised mean difference (Cohen's d) of
  that class against the rest. Large |d|: the neuron separates the concept on its own.

Shapes: F neurons in the layer; top activations (neuron, rank); vocabulary (neuron, rank) with promoted
tokens in values and suppressed ones in extras; concepts (class, neuron).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result, ResultSet


@dataclass(frozen=True)
class NeuronsConfig:
    """Top-activating contexts, vocabulary projections and concept scores of one layer's MLP neurons."""

    layer: int | None = specs.option(None, "MLP layer (default: the middle layer).")
    neurons: str | None = specs.option(None, "Comma-separated neuron indices to report (default: the neurons with "
                                             "the largest activations in the corpus).")
    show: int = specs.option(8, "Neurons reported when --neurons is not given.")
    k: int = specs.option(5, "Top contexts and tokens per neuron.")
    contexts: int = specs.option(64, "Corpus contexts streamed.")
    context: int = specs.option(64, "Tokens per context.")
    batch: int = specs.option(8, "Contexts per forward.")
    window: int = specs.option(8, "Tokens kept before each top activation (and 2 after).")
    concepts: str | None = specs.option(None, "Labelled set for concept neurons (sst2, cola, spam, "
                                              "sae-probes:<stem> or a file); none: skipped.")
    concept_limit: int = specs.option(200, "Examples of the labelled set.")

    def __post_init__(self):
        for name in ("show", "k", "contexts", "context", "batch", "window", "concept_limit"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)}: give a positive number.")
        if self.neurons is not None:
            _indices(self.neurons)


def _indices(text: str) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--neurons {text!r}: give comma-separated integers, e.g. 12,400.") from None
    if not out:
        raise InputError("--neurons: give at least one index.")
    return out


def _layer(model: Model, layer: int | None) -> int:
    model.require(["mlp.post"], "neuron analysis")
    n = model.spec.n_layers
    layer = n // 2 if layer is None else layer
    if not -n <= layer < n:
        raise InputError(f"layer {layer} is out of range: {model.name} has {n} layers.")
    return layer % n


def top_activations(model: Model, contexts: torch.Tensor, layer: int, k: int = 5, batch: int = 8,
                    window: int = 8, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Streamed running top-k of every neuron of ``layer`` over ``contexts`` (N, T).

    Returns values (F, k), their (context, position) (F, k, 2) and token windows (F, k, window + 3)
    (``-1`` where a window passes an edge; the activating token is at index ``window``).
    """
    site = f"blocks.{layer}.mlp.post"
    n, t = contexts.shape
    f = model.spec.d_mlp
    best = torch.full((f, k), float("-inf"))
    where = torch.full((f, k, 2), -1, dtype=torch.long)
    wins = torch.full((f, k, window + 3), -1, dtype=torch.long)
    pad = torch.full((n, window), -1, dtype=torch.long)
    padded = torch.cat([pad, contexts, pad[:, :2]], dim=1)
    for start in tqdm(range(0, n, batch), desc="neuron activations", disable=not progress):
        ids = contexts[start:start + batch]
        acts = model.run(ids, cache=[site], logits="none")[site].float().cpu()  # (b, T, F)
        b = ids.shape[0]
        flat = acts.reshape(b * t, f).T  # (F, b*T)
        kk = min(k, flat.shape[1])
        v, i = flat.topk(kk, dim=1)
        rows, pos = i // t + start, i % t
        cand_v = torch.cat([best, v], dim=1)
        cand_w = torch.cat([where, torch.stack([rows, pos], -1)], dim=1)
        offs = torch.arange(window + 3)
        new_wins = padded[rows[..., None], pos[..., None] + offs]  # (F, kk, window + 3)
        cand_win = torch.cat([wins, new_wins], dim=1)
        top = cand_v.topk(k, dim=1).indices
        best = cand_v.gather(1, top)
        where = cand_w.gather(1, top[..., None].expand(-1, -1, 2))
        wins = cand_win.gather(1, top[..., None].expand(-1, -1, window + 3))
    return best, where, wins


def vocab_projection(model: Model, layer: int, neurons: list[int], k: int = 5) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          list, list]:
    """Promoted and suppressed tokens of each neuron's output direction: values (n, k) each, and token names."""
    with torch.no_grad():
        w = model.W_out(layer)[neurons].float()
        if model.spec.post_norms:
            w = model.norm(f"blocks.{layer}.ln2_post", w)
        logits = model.norm("ln_final", w, scale=1.0) @ model.W_U.float()
    up, down = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    names = [[[model.decode([i]) for i in row] for row in t.indices.tolist()] for t in (up, down)]
    return up.values, down.values, names[0], names[1]


def concept_scores(model: Model, texts, labels, layer: int, batch: int = 8) -> tuple[torch.Tensor, tuple[str, ...]]:
    """(classes, F) Cohen's d of each neuron's mean activation over a text, one class against the rest."""
    site = f"blocks.{layer}.mlp.post"
    feats = []
    texts = list(texts)
    for start in range(0, len(texts), batch):
        out = model.run(texts[start:start + batch], cache=[site], logits="none", padding_side="right")
        mask = out.batch.attention_mask.to(out[site].device)[..., None].float()
        feats.append(((out[site].float() * mask).sum(1) / mask.sum(1)).cpu())
    x = torch.cat(feats)  # (N, F)
    classes = tuple(sorted(set(labels)))
    y = torch.tensor([classes.index(lab) for lab in labels])
    d = torch.zeros(len(classes), x.shape[1])
    for c in range(len(classes)):
        a, b = x[y == c], x[y != c]
        pooled = ((a.var(0, unbiased=True) * (len(a) - 1) + b.var(0, unbiased=True) * (len(b) - 1))
                  / max(len(a) + len(b) - 2, 1)).sqrt().clamp_min(1e-6)
        d[c] = (a.mean(0) - b.mean(0)) / pooled
    return d, classes


def _marked(tokens: list[str], at: int) -> str:
    """A token window as text with the activating token in [[ ]]."""
    return "".join(tokens[:at]) + "[[" + tokens[at] + "]]" + "".join(tokens[at + 1:])


def neuron_report(model: Model, corpus, config: NeuronsConfig | None = None, *, progress: bool = True) -> ResultSet:
    """Top-activating contexts, vocabulary projection and (with ``config.concepts``) concept scores."""
    from lmscope.data.corpus import token_contexts

    config = config or NeuronsConfig()
    layer = _layer(model, config.layer)
    ctx = token_contexts(model, corpus, context=min(config.context, model.spec.n_ctx),
                         max_tokens=config.contexts * config.context)
    best, where, wins = top_activations(model, ctx, layer, config.k, config.batch, config.window, progress)
    if config.neurons is not None:
        chosen = _indices(config.neurons)
        bad = [i for i in chosen if not 0 <= i < model.spec.d_mlp]
        if bad:
            raise InputError(f"neuron(s) {bad} out of range: layer {layer} has {model.spec.d_mlp} neurons.")
    else:
        chosen = best[:, 0].topk(min(config.show, best.shape[0])).indices.tolist()
    texts = [[["" if tok < 0 else model.decode([tok]) for tok in win] for win in neuron]
             for neuron in wins[chosen].tolist()]
    params = {k: getattr(config, k) for k in config.__dataclass_fields__} | {"layer": layer}
    labels = tuple(str(n) for n in chosen)
    ranks = tuple(str(r + 1) for r in range(config.k))
    top = Result(best[chosen], (Axis("neuron", labels), Axis("rank", ranks)), "neuron_top_activations", model.name,
                 {"layer": layer}, params, {"where": where[chosen]},
                 {"contexts": [[_marked(w, config.window) for w in texts[j]] for j in range(len(chosen))]})
    up, down, up_names, down_names = vocab_projection(model, layer, chosen, config.k)
    vocab = Result(up, (Axis("neuron", labels), Axis("rank", ranks)), "neuron_vocab", model.name, {"layer": layer},
                   params, {"suppressed": down}, {"promoted_tokens": up_names, "suppressed_tokens": down_names})
    out = {"top_activations": top, "vocab": vocab}
    if config.concepts:
        from lmscope.data.labelled import load_labelled

        data = load_labelled(config.concepts, limit=config.concept_limit)
        d, classes = concept_scores(model, data.texts, data.labels, layer, config.batch)
        best_idx = d.abs().topk(config.k, dim=1).indices
        out["concepts"] = Result(d, (Axis("class", classes), Axis("neuron", range(d.shape[1]))), "neuron_concepts",
                                 model.name, {"layer": layer, "dataset": data.name}, params, {},
                                 {"top_neurons": {c: [[int(n), float(d[i, n])] for n in best_idx[i]]
                                                  for i, c in enumerate(classes)}})
    return ResultSet(out, "neurons", model.name)


def run_neurons(model: Model, corpus, config: NeuronsConfig) -> ResultSet:
    """Neurons of one MLP layer: top-activating corpus contexts, vocabulary projections, concept neurons."""
    return neuron_report(model, corpus, config)


specs.register(specs.MethodSpec("neurons", "behaviors", "corpus", NeuronsConfig, run_neurons, "resultset",
                                sites=("mlp.post",)))
