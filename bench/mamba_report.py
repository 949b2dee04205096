"""Mamba vs a Transformer of the same size and budget (the self-trained mamba-facts and llama-facts; also
rwkv-facts): fact recall, logit vs tuned lens per layer (bits per byte), causal tracing of the facts, knockout of
the subject -> last token flow per layer (attention or SSM knockout; RWKV has none), and CAA steering between two
cities. Prints one JSON per model.

    python bench/mamba_report.py [--facts 24] [--lens-tokens 16384] [--models mamba-facts llama-facts rwkv-facts]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lmscope
from lmscope import Add, Knockout
from lmscope.data import token_contexts
from lmscope.decoding.steering import caa_vector
from lmscope.decoding.tuned_lens import TunedLensConfig, evaluate_lens, train_tuned_lens
from lmscope.localization.tracing import causal_trace, subject_positions
from lmscope.models.trained import QUERY, facts

FACTS = 96  # the recipe's n_facts


def report(name: str, n_facts: int, lens_tokens: int) -> dict:
    t0 = time.time()
    m = lmscope.load(name, progress=False)
    rows = facts(FACTS)
    prompts = [QUERY.format(s=s) for s, _ in rows]
    cities = [m.token_id(" " + c) for _, c in rows]
    logits = torch.cat([m.run(prompts[i:i + 32], logits="last").logits for i in range(0, len(prompts), 32)])
    probs = logits.float().softmax(-1)
    recall = float((logits.argmax(-1) == torch.tensor(cities)).float().mean())
    out = {"model": name, "n_layers": m.spec.n_layers, "params": sum(p.numel() for p in m.hf.parameters()),
           "fact_top1": recall}

    # lens: logit vs tuned (trained briefly on the corpus), KL per layer in bits per byte
    held = token_contexts(m, "default", 64, "heldout", max_tokens=4096)
    lens = train_tuned_lens(m, "default", TunedLensConfig(tokens=lens_tokens, context=64, batch_contexts=8, lr=1e-3),
                            progress=False)
    ev = evaluate_lens(m, lens, contexts=held)
    bpb = ev.extras["bits_per_byte"]
    out["kl_bits_per_byte_logit"] = [round(float(x), 3) for x in bpb[:-1, 0]]
    out["kl_bits_per_byte_tuned"] = [round(float(x), 3) for x in bpb[:-1, 1]]
    out["tuned_beats_logit_every_layer"] = bool((ev.values[:-1, 1] < ev.values[:-1, 0]).all())

    # causal tracing (hidden) and knockout on the facts the model knows
    known = [i for i in range(FACTS) if int(logits[i].argmax()) == cities[i]][:n_facts]
    n = m.spec.n_layers
    subj_last, last = torch.zeros(n), torch.zeros(n)
    ko_drop = torch.zeros(n)
    for i in known:
        s, _ = rows[i]
        res = causal_trace(m, prompts[i], s, cities[i], samples=5)
        pos = subject_positions(m, prompts[i], s)
        ie = res.extras["indirect_effect"]
        subj_last += ie[:, pos[-1]]
        last += ie[:, -1]
        if "wkv" not in m.parts:  # RWKV has no knockout
            sets = [[Knockout(layer, from_positions=[-1], to_positions=pos)] for layer in range(n)]
            ko = m.run_sets(prompts[i], sets, logits="last").logits[:, 0].float().softmax(-1)[:, cities[i]]
            ko_drop += float(probs[i, cities[i]]) - ko
    k = max(1, len(known))
    out["traced_facts"] = len(known)
    out["trace_ie_subject_last_token"] = [round(float(x), 3) for x in subj_last / k]
    out["trace_ie_last_token"] = [round(float(x), 3) for x in last / k]
    if "wkv" not in m.parts:
        out["knockout_subject_to_last_prob_drop"] = [round(float(x), 3) for x in ko_drop / k]

    # CAA steering between two cities at the middle layer: vector from half the subjects, tested on the rest
    a, b = "Paris", "Tokyo"
    pa = [p for p, (_, c) in zip(prompts, rows) if c == a]
    pb = [p for p, (_, c) in zip(prompts, rows) if c == b]
    layer = n // 2
    half_a, half_b = len(pa) // 2, len(pb) // 2
    vec = caa_vector(m, list(zip(pa[:half_a], pb[:half_b])), layer)
    test = pa[half_a:] + pb[half_b:]
    ia, ib = m.token_id(" " + a), m.token_id(" " + b)
    base = m.run(test, logits="last").logits.float()
    steer = m.run(test, interventions=[Add(f"blocks.{layer}.resid_pre", vec, positions=[-1])], logits="last").logits
    out["steer_layer"] = layer
    out["steer_logit_diff_shift"] = round(float(((steer[:, ia] - steer[:, ib]) - (base[:, ia] - base[:, ib])).mean()),
                                          3)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=24)
    ap.add_argument("--lens-tokens", type=int, default=16384)
    ap.add_argument("--models", nargs="+", default=["mamba-facts", "llama-facts"])
    args = ap.parse_args()
    for name in args.models:
        print(json.dumps(report(name, args.facts, args.lens_tokens)), flush=True)


if __name__ == "__main__":
    main()
