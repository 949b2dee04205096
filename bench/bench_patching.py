"""Benchmark: the full resid_pre activation-patching sweep (every layer × every position) for the IOI
pair on the default model: lmscope (batched, with layer and prefix reuse) against a loop of single
patched forwards and against nnsight (one trace per layer, one invoke per position, if installed).
lmscope is also timed without its work reuse (``run_sets(reuse=False)``). All must give the loop's
(layer × position) logit-difference matrix within the tolerance stated at the check. Issue target: lmscope
≥ 3× faster than nnsight. BENCH_THREADS sets torch's threads."""

from __future__ import annotations

import os

import torch

import lmscope
from lmscope import Patch
from lmscope.localization.patching import activation_patching
from lmscope.localization.tasks import pair

from common import check, finish, interleaved, quick, ratio, record

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET, FOIL = " Mary", " John"


def nnsight_sweep(model, clean_ids, corrupt_ids, t_id, f_id, n_layers):
    from nnsight import LanguageModel

    lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
    L, T = n_layers, clean_ids.shape[1]
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
    L, T = quick(model.spec.n_layers, 3), clean.input_ids.shape[1]  # quick: the first 3 layers
    t_id, f_id = model.token_id(TARGET), model.token_id(FOIL)
    pp = pair(CLEAN, CORRUPT, TARGET, FOIL)
    names = [f"blocks.{layer}.resid_pre" for layer in range(L)]

    def ours():
        return activation_patching(model, pp, "resid_pre", layers=range(L), normalise=False).values

    def no_reuse():  # the same cells through run_sets without work reuse
        cache = model.run(clean, cache=names).cache
        sets = [[Patch(names[layer], value=cache[names[layer]], positions=[p])] for layer in range(L) for p in range(T)]
        lg = model.run_sets(corrupt, sets, reuse=False).logits[:, 0]
        return (lg[:, t_id] - lg[:, f_id]).reshape(L, T)

    def loop():
        cache = model.run(clean, cache=names).cache
        out = torch.empty(L, T)
        for layer in range(L):
            for p in range(T):
                lg = model.run(corrupt, interventions=[Patch(names[layer], value=cache[names[layer]], positions=[p])],
                               logits="last").logits[0]
                out[layer, p] = lg[t_id] - lg[f_id]
        return out

    sides = {"lmscope": ours, "lmscope_no_reuse": no_reuse, "loop": loop}
    try:
        import nnsight  # noqa: F401
    except ImportError:
        peer = "not installed (pip install nnsight)"
    else:
        peer = None
        ids_c, ids_r = clean.input_ids, corrupt.input_ids
        sides["nnsight"] = lambda: nnsight_sweep(model, ids_c, ids_r, t_id, f_id, L)
    times, out = interleaved(sides, warmup=[s for s in sides if s != "loop"])
    # every cell is a logit difference (~3) of float32 logits from batches of other sizes (and, with reuse, from
    # cached keys/values on fewer positions): summation order differs, seen ~1e-5; 1e-3 leaves margin and is far
    # below the effects a sweep reads (≥ 0.01).
    why = "float32 logit differences (~3) from batches of other sizes: summation order differs (seen ~1e-5)"
    checks = [check("lmscope vs loop (layer x position)", out["lmscope"], out["loop"], atol=1e-3, why=why),
              check("lmscope_no_reuse vs loop", out["lmscope_no_reuse"], out["loop"], atol=1e-3, why=why)]
    figures = dict(tokens=T, layers=L, cells=L * T, speedup_vs_loop=ratio(times["loop"], times["lmscope"]),
                   speedup_no_reuse_vs_loop=ratio(times["loop"], times["lmscope_no_reuse"]),
                   speedup_vs_no_reuse=ratio(times["lmscope_no_reuse"], times["lmscope"]))
    work = {
        "lmscope": "activation_patching(): sets grouped by layer, each joining the batch at its patched layer and "
                   "running only positions ≥ its patched one (earlier keys/values from one unpatched run); "
                   "last-position logits only; one clean run for the cache",
        "lmscope_no_reuse": f"the same {L * T} sets through run_sets(reuse=False): batched forwards over every layer "
                            "and position; last-position logits only; one clean run for the cache",
        "loop": f"{L * T} single patched forwards (model.run), every layer and position, logits of all positions "
                "computed, the last kept; one clean run for the cache",
    }
    if peer:
        figures["nnsight"] = peer
    else:
        checks.append(check("lmscope vs nnsight", out["lmscope"], out["nnsight"], atol=1e-3, why=why))
        figures["speedup_vs_nnsight"] = ratio(times["nnsight"], times["lmscope"])
        figures["speedup_no_reuse_vs_nnsight"] = ratio(times["nnsight"], times["lmscope_no_reuse"])
        work["nnsight"] = (f"one trace per layer with one invoke per position ({L} forwards of {T} rows), every layer "
                           "and position, logits of all positions; one clean trace for the cache")
    record("patching_sweep", work=work, timings=times, checks=checks, **figures, target="speedup_vs_nnsight >= 3")


if __name__ == "__main__":
    main()
    finish()
