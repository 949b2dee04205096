"""Benchmark: AtP over all heads (and MLPs) of the default model for IOI prompt pairs, against one
plain forward + backward of the same clean prompts. Target: AtP ≤ 3× the forward + backward.
Also times AtP* (QK fix + GradDrop, about L extra backward passes) and the information-flow
route of a 64-token prompt (target: seconds)."""

from __future__ import annotations


import lmscope
from lmscope.localization.atp import atp, atp_star, encode_pairs
from lmscope.localization.flow import flow
from lmscope.localization.metrics import Metric
from lmscope.localization.tasks import ioi

from common import best_time, record


def main(n_prompts: int = 4) -> None:
    model = lmscope.load(progress=False)
    pairs = ioi(model, n_prompts, seed=0)
    clean, _ = encode_pairs(model, pairs)
    targets, foils = pairs.token_ids(model)
    metric = Metric("logit_diff", targets, foils)

    def forward_backward_full():
        model.hf.zero_grad(set_to_none=True)
        out = model.forward(clean)
        metric(out.logits[:, -1]).backward()
        model.hf.zero_grad(set_to_none=True)

    def run_atp():
        return atp(model, pairs, nodes=("head",), batch_size=n_prompts)

    def run_atp_nodes():
        return atp(model, pairs, nodes=("head", "mlp", "neuron", "resid"), batch_size=n_prompts)

    t_fb = best_time(forward_backward_full, repeats=3)
    t_atp = best_time(run_atp, repeats=3)
    t_all = best_time(run_atp_nodes, repeats=2)
    t_star = best_time(lambda: atp_star(model, pairs, nodes=("head",), batch_size=n_prompts), repeats=1, warmup=0)
    tokens = int(clean.input_ids.shape[1])
    record("atp", prompts=n_prompts, tokens=tokens, forward_backward_s=round(t_fb, 3), atp_heads_s=round(t_atp, 3),
           ratio=round(t_atp / t_fb, 2), atp_all_nodes_s=round(t_all, 3), atp_all_ratio=round(t_all / t_fb, 2),
           atp_star_heads_s=round(t_star, 3), target="ratio <= 3")

    ids = model.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 8)).input_ids[0, :64]
    prompt = model.decode(ids)
    t_flow = best_time(lambda: flow(model, prompt), repeats=2)
    record("flow", tokens=64, layers=model.spec.n_layers, flow_s=round(t_flow, 3), target="seconds")


if __name__ == "__main__":
    main()
