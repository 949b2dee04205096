"""One attention head on one prompt: where it looks, what it matches, what it writes (the app's head inspector).

Three views of head (l, h), side by side:

* **Pattern**: its attention probabilities on the prompt, ``A[i, j]`` (query i, key j), read at the
  ``blocks.{l}.attn.pattern`` site of one forward (values, shape (T, T)).
* **QK circuit on the prompt's tokens** (weights only, as :func:`~lmscope.decoding.projections.qk_scores`:
  each token embedded and normalised by the block's attention norm, RoPE ignored): the score
  ``q(t_i)·k(t_j)/sqrt(dh)`` for every pair of the prompt's tokens (``extras["qk"]``, (T, T)), and for the
  query token at ``position`` the vocabulary's best-matching keys (``meta["qk_top"]``). Comparing it with the
  pattern separates what the head matches by token identity from what it finds by position or context.
* **OV circuit**: for every source token of the prompt, the tokens its OV circuit promotes and suppresses
  (``meta["ov"]``, weights only, as :func:`~lmscope.decoding.projections.ov_circuit`), and the head's actual
  write at ``position`` read through the unembedding with the final norm's scale frozen there
  (``meta["write"]``: what it promotes and suppresses in context).

Paper: Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits" (QK/OV decomposition).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.decoding.projections import ov_outputs, qk_circuit, qk_scores, unembed_direct
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_index, resolve_position


@dataclass(frozen=True)
class HeadInspectConfig:
    """One head on one prompt: attention pattern, QK and OV circuits on its tokens, its write."""

    layer: int = specs.option(0, "Layer of the head.")
    head: int = specs.option(0, "Head index within the layer.")
    position: int | None = specs.option(None, "Query position whose write and QK matches are read (default: last).")
    k: int = specs.option(8, "Tokens per list (promoted, suppressed, matched keys).")

    def __post_init__(self):
        for name in ("layer", "head", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name}={value!r}: give an integer.")
        if self.k < 1:
            raise InputError(f"k={self.k}: give a positive number of tokens.")


def _pairs(model: Model, logits_ND: torch.Tensor, k: int, largest: bool) -> list[list]:
    top = logits_ND.topk(min(k, logits_ND.shape[-1]), dim=-1, largest=largest)
    return [[[model.decode([i]), round(float(v), 4)] for i, v in zip(ids, vals)]
            for ids, vals in zip(top.indices.tolist(), top.values.tolist())]


def run_head_inspect(model: Model, prompt: specs.Prompt, config: HeadInspectConfig) -> Result:
    """One attention head on one prompt: its pattern, its QK and OV circuits on the prompt's tokens, its write."""
    s = model.spec
    layer = resolve_index(config.layer, s.n_layers, "layer", model.name)
    head = resolve_index(config.head, s.n_heads, "head", model.name, unit="heads per layer")
    pre = f"blocks.{layer}."
    with torch.no_grad():
        run = model.run(prompt.text, cache=[pre + "attn.pattern", pre + "attn.head_out", "final.scale"],
                        logits="none")
    ids = run.batch.input_ids[0].tolist()
    tokens = run.batch.str_tokens[0]
    pos = resolve_position(config.position, len(ids))
    k = resolve_count(config.k, s.d_vocab, "top tokens")
    with torch.no_grad():
        pattern = run[pre + "attn.pattern"][0, head].float()                       # (T, T)
        write = run[pre + "attn.head_out"][0, pos, head].float()                   # (D,)
        write_logits = model.unembed(write[None], scale=run["final.scale"][0, pos])
        qk = qk_scores(model, layer, head, ids, ids).float()                        # (T, T)
        distinct = list(dict.fromkeys(ids))
        ov_logits = unembed_direct(model, ov_outputs(model, layer, head, distinct))  # (n, V)
    matched = qk_circuit(model, layer, head, [ids[pos]], k=k)
    up, down = _pairs(model, ov_logits, k, True), _pairs(model, ov_logits, k, False)
    ov = [{"token": model.decode([t]), "promotes": u, "suppresses": d} for t, u, d in zip(distinct, up, down)]
    labels = tuple(f"{i}:{t}" for i, t in enumerate(tokens))
    meta = {"tokens": tokens, "position": pos, "ov": ov,
            "ov_index": [distinct.index(t) for t in ids],  # prompt position -> its row of "ov"
            "write": {"promotes": _pairs(model, write_logits, k, True)[0],
                      "suppresses": _pairs(model, write_logits, k, False)[0]},
            "qk_top": [[tok, round(float(v), 4)] for tok, v in zip(matched.meta["top_tokens"][0],
                                                                   matched.values[0].tolist())]}
    return Result(pattern, (Axis("query", labels), Axis("key", labels)), "head-inspect", model.name,
                  {"layer": layer, "head": head, "position": pos},
                  {"layer": config.layer, "head": config.head, "position": config.position, "k": config.k},
                  {"qk": qk}, meta)


specs.register(specs.MethodSpec("head-inspect", "decoding", "prompt", HeadInspectConfig, run_head_inspect,
                                sites=("attn.pattern", "attn.head_out", "final.scale"), cli_inputs=("text",)))
