"""SAE training throughput from stored activations: lmscope's trainer against a plain PyTorch loop.

576 -> 4608 SAEs on SmolLM2 layer-15 resid_post activations (an activation store; harvested first when
``LMSCOPE_SAE_STORE`` does not point at one). TopK (k = 32) and ReLU, batch 4096, tokens per second over the same
number of steps (data loading included in all). The plain loop is what one writes without a library: dense
encode, top-k, dense decode, MSE, Adam. SAELens (pip ``sae-lens``, installed by the ``dev`` extra next to the
CPU torch; it pulls transformer-lens, datasets and wandb) is timed
with its own ``SAETrainer`` on the same batches when it imports: ``TopKTrainingSAE`` (k = 32) and
``StandardTrainingSAE`` (L1 5.0), no wandb, no checkpoints. Also records harvest throughput when it harvests.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from common import record

D, F, K, BS = 576, 4608, 32, 4096
STEPS = int(os.environ.get("LMSCOPE_SAE_BENCH_STEPS", "12"))


def _store(n_tokens: int):
    from lmscope.data import ActivationStore, harvest, token_contexts

    path = os.environ.get("LMSCOPE_SAE_STORE")
    if path and Path(path).exists():
        return ActivationStore(path, allow_incomplete=True), None
    import lmscope

    m = lmscope.load(progress=False)
    ctx = token_contexts(m, "default", context=128, split="train", max_tokens=n_tokens * 128 // 127 + 256)
    out = Path(tempfile.mkdtemp()) / "l15"
    t = time.perf_counter()
    store = harvest(m, "blocks.15.resid_post", ctx, out, n_tokens=n_tokens, batch_size=16, progress=False)
    return store, len(store) / (time.perf_counter() - t)


def _lmscope(store, arch: str) -> float:
    from lmscope.sae import TrainConfig, make_sae, train

    sae = make_sae(arch, d_in=D, d_sae=F, **({"k": K} if arch == "topk" else {}))
    cfg = TrainConfig(tokens=BS * STEPS, batch_size=BS, checkpoint_every=0, init_sample=4096)
    t = time.perf_counter()
    train(sae, store, cfg, progress=False)
    return BS * STEPS / (time.perf_counter() - t)


def _plain(store, arch: str) -> float:
    torch.manual_seed(0)
    W_dec = torch.nn.Parameter(torch.randn(F, D) / D ** 0.5)
    W_enc = torch.nn.Parameter(W_dec.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(F)), torch.nn.Parameter(torch.zeros(D))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=4e-4)
    t = time.perf_counter()
    for i, x in enumerate(store.batches(BS, shuffle=True, seed=0)):
        if i == STEPS:
            break
        pre = (x - b_dec) @ W_enc + b_enc
        if arch == "topk":
            v, idx = pre.topk(K, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(v))
        else:
            f = torch.relu(pre)
        loss = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        if arch == "relu":
            loss = loss + 5.0 * (f * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return BS * STEPS / (time.perf_counter() - t)


def _saelens(store, arch: str) -> float | None:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import sae_lens as sl
            from sae_lens.config import SAETrainerConfig
    except ImportError:
        return None
    if arch == "topk":
        sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D, d_sae=F, k=K, device="cpu"))
    else:
        sae = sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(d_in=D, d_sae=F, l1_coefficient=5.0,
                                                                  device="cpu"))
    batches = store.batches(BS, shuffle=True, seed=0, epochs=10, drop_last=True)
    trainer = sl.SAETrainer(cfg=SAETrainerConfig(total_training_samples=BS * STEPS, train_batch_size_samples=BS,
                                                 lr=4e-4, lr_end=4e-4), sae=sae, data_provider=batches)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit()
    return BS * STEPS / (time.perf_counter() - t)


def main() -> None:
    store, harvest_tps = _store(int(os.environ.get("LMSCOPE_SAE_BENCH_TOKENS", "200000")))
    figures = {"store_tokens": len(store), "steps": STEPS, "batch": BS}
    if harvest_tps is not None:
        figures["harvest_tokens_per_s"] = round(harvest_tps, 1)
    for arch in ("topk", "relu"):
        ours, plain = _lmscope(store, arch), _plain(store, arch)
        figures[f"{arch}_lmscope_tokens_per_s"] = round(ours, 1)
        figures[f"{arch}_plain_tokens_per_s"] = round(plain, 1)
        figures[f"{arch}_speedup_vs_plain"] = round(ours / plain, 2)
        theirs = _saelens(store, arch)
        if theirs is not None:
            figures[f"{arch}_saelens_tokens_per_s"] = round(theirs, 1)
            figures[f"{arch}_speedup_vs_saelens"] = round(ours / theirs, 2)
    record("sae_train", **figures)


if __name__ == "__main__":
    main()
