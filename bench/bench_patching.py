"""Benchmark: the full resid_pre activation-patching sweep (every layer × every position) for the IOI
pair on the default model: lmscope (batched, with layer and prefix reuse) against a loop of single
patched forwards and against nnsight (one trace per layer, one invoke per position, if installed).
All must give the same (layer × position) logit-difference matrix; max abs differences are recorded.
Issue target: lmscope ≥ 3× faster than nnsight."""

from __future__ import annotations

import os
import sys
import time

import torch

import lmscope
from lmscope import Patch
from lmscope.localization.patching import activation_patching
from lmscope.localization.tasks import pair

from common import best_time, record

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET, FOIL = " Mary", " John"


def nnsight_sweep(model, clean_ids, corrupt_ids, t_id, f_id):
    from nnsight import LanguageModel

    lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
    L, T = model.spec.n_layers, clean_ids.shape[1]
    layers = lm.model.layers
    with torch.no_grad():
        clean_h = []
        with lm.trace(clean_ids):
            for layer in range(L):
                clean_h.append(layers[layer].input.save())
        rows = []
        for layer in range(L):
            outs = []
            with lm.trace() as tracer:
                for p in range(T):
                    with tracer.invoke(corrupt_ids):
                        layers[layer].input[:, p] = clean_h[layer][:, p]
                        outs.append(lm.lm_head.output[:, -1].save())
            rows.append(torch.stack([o[0, t_id] - o[0, f_id] for o in outs]))
    return torch.stack(rows)


def main() -> None:
    threads = int(os.environ.get("BENCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model = lmscope.load(progress=False)
    clean, corrupt = model.encode(CLEAN), model.encode(CORRUPT)
    L, T = model.spec.n_layers, clean.input_ids.shape[1]
    t_id, f_id = model.token_id(TARGET), model.token_id(FOIL)
    pp = pair(CLEAN, CORRUPT, TARGET, FOIL)

    def ours():
        return activation_patching(model, pp, "resid_pre", normalise=False).values

    names = [f"blocks.{layer}.resid_pre" for layer in range(L)]

    def loop():
        cache = model.run(clean, cache=names).cache
        out = torch.empty(L, T)
        for layer in range(L):
            for p in range(T):
                lg = model.run(corrupt, interventions=[Patch(names[layer], value=cache[names[layer]], positions=[p])],
                               logits="last").logits[0]
                out[layer, p] = lg[t_id] - lg[f_id]
        return out

    def plain_batched():  # the foundation without reuse: one batched forward per layer group
        cache = model.run(clean, cache=names).cache
        sets = [[Patch(names[layer], value=cache[names[layer]], positions=[p])] for layer in range(L) for p in range(T)]
        lg = model.run_sets(corrupt, sets, reuse=False).logits[:, 0]
        return (lg[:, t_id] - lg[:, f_id]).reshape(L, T)

    repeats = int(os.environ.get("BENCH_REPEATS", "3"))  # 0: time the first (matrix) run only

    def timed(fn):
        t0 = time.perf_counter()
        value = fn()
        first = time.perf_counter() - t0
        return value, round(min(first, best_time(fn, repeats, warmup=0)) if repeats else first, 3)

    figures = dict(tokens=T, layers=L, cells=L * T, threads=torch.get_num_threads(), repeats=repeats)
    m_ours, figures["lmscope_s"] = timed(ours)
    m_plain, figures["plain_batched_s"] = timed(plain_batched)
    t0 = time.perf_counter()
    m_loop = loop()
    figures["loop_s"] = round(time.perf_counter() - t0, 3)
    figures["max_abs_diff_loop"] = float((m_ours - m_loop).abs().max())
    figures["max_abs_diff_plain"] = float((m_ours - m_plain).abs().max())
    figures["speedup_vs_loop"] = round(figures["loop_s"] / figures["lmscope_s"], 2)
    figures["speedup_vs_plain_batched"] = round(figures["plain_batched_s"] / figures["lmscope_s"], 2)
    try:
        import nnsight  # noqa: F401
    except ImportError:
        figures["nnsight"] = "not installed (pip install nnsight)"
    else:
        ids_c, ids_r = clean.input_ids, corrupt.input_ids
        m_nn, figures["nnsight_s"] = timed(lambda: nnsight_sweep(model, ids_c, ids_r, t_id, f_id))
        figures["max_abs_diff_nnsight"] = float((m_ours - m_nn).abs().max())
        figures["speedup_vs_nnsight"] = round(figures["nnsight_s"] / figures["lmscope_s"], 2)
    record("patching_sweep", **figures, target="speedup_vs_nnsight >= 3")


if __name__ == "__main__":
    sys.exit(main())
