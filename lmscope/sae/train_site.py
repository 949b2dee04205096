"""Training an SAE on one site of a model, end to end: harvest the site's activations from a corpus into
``OUT/activations`` (or read an existing store), build the SAE, train it with checkpoints in OUT (a killed
run resumes when started again with the same options) and write it in SAELens's layout. Under
``torchrun --nproc_per_node N`` it trains data-parallel (rank 0 harvests).

The Result is the training log: values (logged step, metric) with metrics loss, l0, fve; the SAE itself
is in OUT (:func:`lmscope.sae.load_sae`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sae.io import ARCHS
from lmscope.sae.training import SCHEDULES
from lmscope.sites import GLOBAL_KINDS

_COEFF = {"relu": "l1", "gated": "l1", "jumprelu": "l0"}
LOGGED = ("loss", "l0", "fve")


@dataclass(frozen=True)
class SAETrainConfig:
    """Options of :func:`train_site_sae`."""

    arch: str = specs.option(help="relu | gated | topk | jumprelu", flags=("--arch",))
    out_dir: str = specs.option(help="Output folder (SAE files, checkpoint, log).", flags=("--out",), output="folder")
    site: str = specs.option("resid_post", "Site kind (resid_post, mlp_out, attn.z, ...) or full name.")
    layer: int | None = specs.option(None, "Layer of the site (default: the middle layer).")
    latents: int = specs.option(4608, "Number of latents (dictionary size).")
    k: int | None = specs.option(None, "TopK: active latents per token (default 32).")
    l1: float | None = specs.option(None, "Sparsity coefficient (L1 for relu/gated, L0 for jumprelu).",
                                    flags=("--l1",))
    tokens: int = specs.option(1_000_000, "Training tokens.")
    store: str | None = specs.option(None, "An existing activation store (default: harvest into OUT).")
    batch_size: int = specs.option(4096, "Tokens per step.")
    lr: float = specs.option(4e-4, "Learning rate.")
    context: int = specs.option(128, "Context length when harvesting.")
    seed: int = specs.option(0, "Seed (initialisation and batch order).")
    schedule: str = specs.option("warmup_decay", "warmup_decay (LR warm-up and decay, λ warm-up) | constant (constant "
                                                 "LR and λ from the first step).", choices=SCHEDULES)
    max_norm_ratio: float | None = specs.option(None, "Leave out activations whose norm exceeds this multiple of the "
                                                      "median (attention-sink tokens); loads the store into memory.")

    def __post_init__(self):
        specs.check_config(self)
        if self.arch not in ARCHS:
            raise InputError(f"Unknown SAE architecture {self.arch!r} (--arch); use one of {', '.join(ARCHS)}.")
        for name, low in (("latents", 1), ("tokens", 1), ("batch_size", 1), ("context", 2)):
            if getattr(self, name) < low:
                raise InputError(f"--{name.replace('_', '-')} {getattr(self, name)}: give at least {low}.")
        if self.store is not None:
            from lmscope.data import ActivationStore

            ActivationStore(self.store)  # a folder that is not a store fails now, not after loading the model

    def arch_fields(self) -> dict:
        if self.arch == "topk":
            return {"k": self.k if self.k is not None else 32}
        if self.arch in _COEFF and self.l1 is not None:
            return {_COEFF[self.arch]: self.l1}
        return {}


def site_name(site: str, layer: int | None, n_layers: int) -> str:
    """A full site name from ``site`` and ``layer`` (default: the middle layer)."""
    if site.startswith("blocks.") or site in GLOBAL_KINDS:
        return site
    return f"blocks.{n_layers // 2 if layer is None else layer}.{site}"


def train_site_sae(model: Model, corpus, config: SAETrainConfig) -> Result:
    """Train an SAE on one site of the model: harvest (or read) its activations, train with checkpoints, write
    the SAE to OUT in SAELens's layout."""
    from pathlib import Path

    import torch.distributed as dist

    from lmscope.data import ActivationStore, harvest, token_contexts
    from lmscope.sae.io import check_fits, make_sae
    from lmscope.sae.training import TensorSource, TrainConfig, train
    from lmscope.sites import parse_site

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = parse_site(site_name(config.site, config.layer, model.spec.n_layers), model.spec.n_layers).name
    fields, sp, out_dir = config.arch_fields(), model.spec, Path(config.out_dir)
    make_sae(config.arch, d_in=sp.d_model, d_sae=config.latents, **fields)  # fail on bad options before harvesting
    cfg = TrainConfig(tokens=config.tokens, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                      schedule=config.schedule)
    if config.store is None:
        store_dir = out_dir / "activations"
        if rank == 0:
            ctx = token_contexts(model, corpus or "default", context=config.context, split="train",
                                 max_tokens=int(config.tokens * config.context / (config.context - 1)) + config.context)
            harvest(model, name, ctx, store_dir, n_tokens=config.tokens)
        if dist.is_initialized():
            dist.barrier()
        source = ActivationStore(store_dir)
    else:
        source = ActivationStore(config.store)
    if config.max_norm_ratio:
        source = TensorSource.from_store(source, max_norm_ratio=config.max_norm_ratio)
    d_head = sp.d_head if name.endswith("attn.z") else 0
    sae = make_sae(config.arch, d_in=source.d, d_sae=config.latents, site=name, model=model.name, d_head=d_head,
                   seed=config.seed, **fields)
    check_fits(sae, model)
    state = train(sae, source, cfg, out_dir)
    rows = [[float(h.get(m, float("nan"))) for m in LOGGED] for h in state.history] or [[float("nan")] * len(LOGGED)]
    steps = [str(h.get("step", i)) for i, h in enumerate(state.history)] or ["0"]
    return Result(torch.tensor(rows), (Axis("step", tuple(steps)), Axis("metric", LOGGED)), "sae_train", model.name,
                  params={"arch": config.arch, "site": name, "latents": config.latents, **fields,
                          "tokens": config.tokens, "batch_size": config.batch_size, "lr": config.lr,
                          "schedule": config.schedule,
                          "seed": config.seed},
                  meta={"out_dir": str(out_dir), "steps": state.step})


specs.register(specs.MethodSpec("sae-train", "sae", "corpus", SAETrainConfig, train_site_sae,
                                sites=("resid_post",), cli=("sae", "train")))
