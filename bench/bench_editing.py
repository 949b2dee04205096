"""Benchmark: ROME's two costs on the default model, the key moment C of one layer and one edit.

* ``C``: ``second_moment`` of ``blocks.4.mlp`` (the forward stops once block 4's MLP keys are known,
  float64 accumulation) against a plain loop that runs the whole model (30 blocks and the unembedding)
  with ``mlp.post`` cached and accumulates the same sum. The issue's figure is C from 10⁶ tokens; this
  times ``TOKENS`` and reports tokens per second, from which 10⁶ tokens' time follows.
* ``edit``: one ``rome()`` edit (k* over the prompt and 20 generated prefixes, v* by 20 Adam steps at
  most with the prompts batched in one forward per step, the rank-one update), timed alone; its check is
  ROME's closed form: the edited matrix maps k* to v* (W' k* = v*).
"""

from __future__ import annotations

import torch

import lmscope
from lmscope.data import token_contexts
from lmscope.editing import Fact, RomeSettings, compute_key, compute_value, rank_one_update, second_moment
from lmscope.editing.rome import context_prefixes, templates

from common import check, finish, interleaved, quick, ratio, record

LAYER = 4
TOKENS = quick(32 * 128, 4 * 128)
FACT = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Rome")


def main() -> None:
    model = lmscope.load(progress=False)
    mem = model.memory(LAYER)
    ctx = token_contexts(model, "default", 128, split="train", max_tokens=TOKENS)

    def store():
        return second_moment(model, LAYER, tokens=TOKENS, cache=False, progress=False)

    def plain():
        total, count = 0, 0
        with torch.no_grad():
            for b in range(0, len(ctx), 8):
                keys = model.run(ctx[b:b + 8], cache=[mem.key_site], logits="all")[mem.key_site][:, 1:]
                keys = keys.reshape(-1, mem.shape[1]).double()
                total, count = total + keys.T @ keys, count + keys.shape[0]
        return (total / count).float()

    times, out = interleaved({"lmscope": store, "plain": plain})
    settings = RomeSettings(prefixes=quick(((10, 5), (10, 10)), ((1, 5),)), steps=quick(20, 2))
    prefixes = context_prefixes(model, settings.prefixes, settings.seed)
    tmpls = templates(model, settings, prefixes)
    C = out["lmscope"]
    k = {}

    def edit():
        k["k"] = compute_key(model, FACT, LAYER, tmpls)
        k["v"], k["info"] = compute_value(model, FACT, LAYER, k["k"], tmpls, settings)
        return rank_one_update(mem.weight(), C, k["k"], k["v"], settings.ridge)

    t_edit, got = interleaved({"edit": edit}, warmup=False)
    with model.edit({mem.name: got["edit"]}):
        mapped = model.memory(LAYER).weight() @ k["k"]
    checks = [check("C stopped at block 4 vs a full forward's cache", out["lmscope"], out["plain"], atol=1e-5,
                    rtol=1e-4, why="the same float32 keys summed in float64; batches may differ in kernel"),
              check("W' k* = v* after the edit", mapped, k["v"], atol=1e-3, rtol=1e-4,
                    why="the rank-one update's closed form, up to the float32 matrix product (|v*| ~ 10)")]
    work = {"lmscope": "second_moment(): forwards of 8 contexts stopped after block 4's MLP keys, k kᵀ summed in "
                       "float64",
            "plain": "model.run over all 30 blocks and the unembedding with mlp.post cached, the same sum",
            "edit": f"rome() parts: k* over {len(tmpls)} templates, v* by ≤ {settings.steps} Adam steps "
                    f"({len(tmpls) + 1} prompts per forward), the rank-one update"}
    record("editing", work=work, timings={**times, **t_edit}, checks=checks, model=model.name, layer=LAYER,
           tokens=len(ctx) * 128, c_tokens_per_s=round(len(ctx) * 128 / times["lmscope"].median, 1),
           c_speedup=ratio(times["plain"], times["lmscope"]), v_steps=k["info"]["steps"],
           seconds_for_1e6_tokens=round(1e6 / (len(ctx) * 128) * times["lmscope"].median, 1))


if __name__ == "__main__":
    main()
    finish()
