"""Weight projections: read heads, neurons and directions in vocabulary space (no forward pass).

Following Elhage et al. (2021, "A Mathematical Framework") and Geva et al. (2022), a component's
weights are decoded through the embedding and unembedding:

* **OV circuit** of head (l, h): an input token t is embedded, normalised by the block's attention
  input norm (the model's own module, gain included), mapped by ``W_V[h]`` (+ bias) and ``W_O[h]``
  (and the attention post-norm where the model has one), then read by the unembedding with the final
  norm's gain (its input-dependent scale does not change a row's ranking). The top tokens are what
  the head *promotes* when it attends to t.
* **QK circuit** of head (l, h): for a query token, the score ``q·k / sqrt(dh)`` against every key
  token, both embedded and normalised as above (RoPE at relative distance 0, i.e. ignored; per-head
  q/k norms such as Gemma 3's are not modelled). The top keys are the tokens the head *matches*.
* **Neuron** (l, n): its output direction (row n of the down projection) read by the unembedding:
  the tokens it promotes and suppresses when it fires positively.
* **Any vector** (D,) written to the residual stream, e.g. an SAE feature's decoder row or a
  steering direction: the same read-out. :func:`embedding_matches` gives the input tokens whose
  embeddings align best with a direction (e.g. an SAE encoder row).

Positional embeddings (GPT-2) are ignored. Shapes: OV/QK results (input token, rank); neuron and
vector results (side: promoted/suppressed, rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from lmscope import specs
from lmscope.results import ResultSet
from collections.abc import Sequence

import torch

from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_index


def _layer_head(model: Model, layer: int, head: int | None = None) -> tuple[int, int | None]:
    layer = resolve_index(layer, model.spec.n_layers, "layer", model.name)
    if head is not None:
        head = resolve_index(head, model.spec.n_heads, "head", model.name, unit="heads per layer")
    return layer, head


COMMON_WORDS = (" the", " Paris", " cat", " John", " 1", " and")


def common_tokens(model: Model, words: Sequence[str] = COMMON_WORDS) -> list[int]:
    """Ids of those ``words`` that are one known token for ``model`` (the default inputs of the OV and QK
    read-outs: a word that splits, such as SmolLM2's ' 1', or maps to the unknown token is left out)."""
    unk = model.tokenizer.unk_token_id
    ids = [i[0] for i in (model.tokenizer.encode(w, add_special_tokens=False) for w in words)
           if len(i) == 1 and i[0] != unk]
    if not ids:
        raise InputError(f"None of {list(words)} is a single token for {model.name}; give the input tokens "
                         "explicitly (tokens=[...], or --tokens on the command line).")
    return list(dict.fromkeys(ids))


def _token_ids(model: Model, tokens: Sequence[str | int] | None) -> list[int]:
    if tokens is None:
        return common_tokens(model)
    if not tokens:
        raise InputError("Give at least one input token, e.g. ' Paris'.")
    return [model.token_id(t) for t in tokens]


def normed_embeddings(model: Model, layer: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings (n, D) (all tokens when ``ids`` is None) through block ``layer``'s attention norm."""
    W_E = model.W_E if ids is None else model.W_E[ids]
    return model.norm(f"blocks.{layer}.ln1", W_E)


def unembed_direct(model: Model, vectors: torch.Tensor) -> torch.Tensor:
    """Direct logit contributions (..., V) of residual writes (..., D): final-norm gain (scale 1), W_U."""
    return model.unembed(vectors, scale=1.0)


def ov_outputs(model: Model, layer: int, head: int, ids: Sequence[int]) -> torch.Tensor:
    """The head's residual write (n, D) for each input token it attends to (with full attention)."""
    layer, head = _layer_head(model, layer, head)
    x = normed_embeddings(model, layer, torch.tensor(list(ids)))
    with torch.no_grad():
        v = x @ model.W_V(layer)[head].float()
        b = model.b_V(layer)
        if b is not None:
            v = v + b[head].float()
        out = v @ model.W_O(layer)[head].float()
        if model.spec.post_norms:
            out = model.norm(f"blocks.{layer}.ln1_post", out)
    return out


def _top_table(model: Model, scores: torch.Tensor, k: int, largest: bool = True):
    k = min(resolve_count(k, model.spec.d_vocab, "top tokens"), scores.shape[-1])
    top = scores.topk(k, dim=-1, largest=largest)
    names = [[model.decode([i]) for i in row] for row in top.indices.tolist()]
    return top.values, top.indices, names


def ov_circuit(model: Model, layer: int, head: int, tokens: Sequence[str | int] | None = None, *,
               k: int = 10) -> Result:
    """Top-k tokens the OV circuit of head (layer, head) promotes for each input token
    (default: :func:`common_tokens`).

    values (input_token, rank): direct logits; meta ``top_tokens`` and ``top_ids``; extras
    ``bottom`` (input_token, rank), the most suppressed tokens' logits (names in meta ``bottom_tokens``).
    """
    layer, head = _layer_head(model, layer, head)
    ids = _token_ids(model, tokens)
    logits = unembed_direct(model, ov_outputs(model, layer, head, ids))
    vals, idx, names = _top_table(model, logits, k)
    bvals, _, bnames = _top_table(model, logits, k, largest=False)
    labels = tuple(model.decode([i]) for i in ids)
    return Result(vals, (Axis("input_token", labels), Axis("rank", tuple(str(r + 1) for r in range(vals.shape[1])))),
                  "ov_circuit", model.name, {"layer": layer, "head": head}, {"k": k},
                  {"bottom": bvals}, {"top_tokens": names, "top_ids": idx.tolist(), "bottom_tokens": bnames,
                                      "input_ids": ids})


def qk_scores(model: Model, layer: int, head: int, query_ids: Sequence[int], key_ids: Sequence[int] | None = None
              ) -> torch.Tensor:
    """Attention scores (n_q, n_k) q·k/sqrt(dh) between query and key tokens (all tokens when None)."""
    layer, head = _layer_head(model, layer, head)
    q_x = normed_embeddings(model, layer, torch.tensor(list(query_ids)))
    k_x = normed_embeddings(model, layer, None if key_ids is None else torch.tensor(list(key_ids)))
    with torch.no_grad():
        q = q_x @ model.W_Q(layer)[head].float()
        k = k_x @ model.W_K(layer)[head].float()
        bq, bk = model.b_Q(layer), model.b_K(layer)
        if bq is not None:
            q = q + bq[head].float()
        if bk is not None:
            k = k + bk[head].float()
        return q @ k.T / model.spec.d_head ** 0.5


def qk_circuit(model: Model, layer: int, head: int, tokens: Sequence[str | int] | None = None, *,
               k: int = 10) -> Result:
    """Top-k key tokens (over the vocabulary) that each query token's QK circuit scores highest
    (query tokens default to :func:`common_tokens`).

    values (query_token, rank): scores q·k/sqrt(dh); meta ``top_tokens``, ``top_ids``.
    """
    layer, head = _layer_head(model, layer, head)
    ids = _token_ids(model, tokens)
    scores = qk_scores(model, layer, head, ids)
    vals, idx, names = _top_table(model, scores, k)
    labels = tuple(model.decode([i]) for i in ids)
    return Result(vals, (Axis("query_token", labels), Axis("rank", tuple(str(r + 1) for r in range(vals.shape[1])))),
                  "qk_circuit", model.name, {"layer": layer, "head": head}, {"k": k}, {},
                  {"top_tokens": names, "top_ids": idx.tolist(), "input_ids": ids})


def vector_tokens(model: Model, vector: torch.Tensor, *, k: int = 10, method: str = "vector_tokens",
                  target: dict | None = None) -> Result:
    """Tokens a residual-stream write ``vector`` (D,) promotes and suppresses most (direct logits).

    values (side, rank) with side promoted/suppressed; meta ``tokens`` (2, k) and ``ids``.
    """
    vector = torch.as_tensor(vector).detach().float()
    if vector.ndim != 1 or vector.shape[0] != model.spec.d_model:
        raise InputError(f"The vector must be (D,) with D = {model.spec.d_model} (the residual width of "
                         f"{model.name}).")
    logits = unembed_direct(model, vector)
    up, up_idx, up_names = _top_table(model, logits[None], k)
    down, down_idx, down_names = _top_table(model, logits[None], k, largest=False)
    values = torch.cat([up, down])
    return Result(values, (Axis("side", ("promoted", "suppressed")),
                           Axis("rank", tuple(str(r + 1) for r in range(values.shape[1])))),
                  method, model.name, target, {"k": k}, {},
                  {"tokens": up_names + down_names, "ids": up_idx.tolist() + down_idx.tolist()})


def neuron_tokens(model: Model, layer: int, neuron: int, *, k: int = 10) -> Result:
    """Tokens neuron (layer, neuron)'s output direction promotes and suppresses (per unit activation)."""
    layer, _ = _layer_head(model, layer)
    neuron = resolve_index(neuron, model.spec.d_mlp, "neuron", model.name, unit="neurons per layer")
    with torch.no_grad():
        w = model.W_out(layer)[neuron].float()
        if model.spec.post_norms:
            w = model.norm(f"blocks.{layer}.ln2_post", w)
    return vector_tokens(model, w, k=k, method="neuron_tokens", target={"layer": layer, "neuron": neuron})


def embedding_matches(model: Model, direction: torch.Tensor, *, k: int = 10) -> Result:
    """Input tokens whose embedding has the largest cosine with ``direction`` (D,), and the smallest."""
    d = torch.as_tensor(direction).detach().float()
    if d.ndim != 1 or d.shape[0] != model.spec.d_model or d.norm() == 0:
        raise InputError(f"The direction must be a non-zero (D,) vector with D = {model.spec.d_model}.")
    W_E = model.W_E.detach().float()
    cos = (W_E @ d) / (W_E.norm(dim=-1).clamp_min(1e-12) * d.norm())
    up, up_idx, up_names = _top_table(model, cos[None], k)
    down, down_idx, down_names = _top_table(model, cos[None], k, largest=False)
    return Result(torch.cat([up, down]), (Axis("side", ("aligned", "opposed")),
                                          Axis("rank", tuple(str(r + 1) for r in range(up.shape[1])))),
                  "embedding_matches", model.name, None, {"k": k}, {},
                  {"tokens": up_names + down_names, "ids": up_idx.tolist() + down_idx.tolist()})


# ------------------------------------------------------------------------------------------------ spec
def _layer_index(text: str, what: str) -> tuple[int, int]:
    try:
        a, b = text.split(".")
        return int(a), int(b)
    except ValueError:
        raise InputError(f"--{what} {text!r}: write LAYER.INDEX, e.g. 3.5.") from None


@dataclass(frozen=True)
class ProjectConfig:
    """Weight projections of one head or one neuron."""

    head: str | None = specs.option(None, "Head as LAYER.HEAD, e.g. 5.3.")
    neuron: str | None = specs.option(None, "Neuron as LAYER.NEURON, e.g. 10.1234.")
    tokens: str | None = specs.option(None, "Comma-separated input tokens for a head (mind leading spaces), e.g. "
                                            "' Paris, London'. Default: those of a few common words that are single tokens "
                                            "for the model.")
    k: int = specs.option(10, "Tokens per row.")

    def __post_init__(self):
        if (self.head is None) == (self.neuron is None):
            raise InputError("Give exactly one of --head LAYER.HEAD or --neuron LAYER.NEURON.")
        _layer_index(self.head or self.neuron, "head" if self.head else "neuron")


def run_project(model: Model, inputs: None, config: ProjectConfig) -> ResultSet:
    """Weight projections: a head's OV/QK circuits or a neuron's output direction in vocabulary space."""
    if config.neuron is not None:
        layer, n = _layer_index(config.neuron, "neuron")
        return ResultSet({"neuron": neuron_tokens(model, layer, n, k=config.k)}, "project", model.name)
    layer, h = _layer_index(config.head, "head")
    words = None if config.tokens is None else [t for t in config.tokens.split(",") if t]  # None: common_tokens
    return ResultSet({"ov": ov_circuit(model, layer, h, words, k=config.k),
                      "qk": qk_circuit(model, layer, h, words, k=config.k)}, "project", model.name)


specs.register(specs.MethodSpec("project", "decoding", "none", ProjectConfig, run_project, "resultset"))
