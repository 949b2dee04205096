"""Training and evaluating a tuned lens as workflows: train on a corpus and save the lens to a folder
(also under ``torchrun``, data-parallel; only rank 0 writes), and evaluate held-out KL and cross-entropy per
layer beside the logit lens. The command line's ``lmscope lens train`` and ``lens eval`` run these specs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.decoding.tuned_lens import TunedLens, TunedLensConfig, evaluate_lens, layer_labels, train_tuned_lens
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result


@dataclass(frozen=True)
class TrainLensConfig:
    """Options of :func:`train_lens`."""

    tokens: int = specs.option(help="Training tokens (steps = tokens / (batch·context)).")
    out_dir: str = specs.option(help="Folder to write the lens to.", flags=("--out",))
    layers: str | None = specs.option(None, "Layers to train: 'embed', 0, 1, ... comma-separated; default all.")
    context: int = specs.option(128, "Tokens per context.")
    batch: int = specs.option(8, "Contexts per step (global, split across torchrun processes).")
    optimizer: str = specs.option("adam", "adam | sgd (the reference recipe).", choices=("adam", "sgd"))
    lr: float | None = specs.option(None, "Learning rate (default: adam 1e-4, sgd 0.1).")
    seed: int = specs.option(0, "Random seed.")
    eval_tokens: int = specs.option(0, "Also evaluate on this many held-out tokens (0: skip).")

    def __post_init__(self):
        specs.check_config(self)
        self.train_config()

    def train_config(self) -> TunedLensConfig:
        return TunedLensConfig(tokens=self.tokens, context=self.context, batch_contexts=self.batch,
                               optimizer=self.optimizer, lr=self.lr, seed=self.seed)


def train_lens(model: Model, corpus, config: TrainLensConfig) -> Result:
    """Train a tuned lens and save it to ``out_dir``; run under `torchrun --nproc_per_node K` for DDP.

    Returns the held-out evaluation (with ``eval_tokens``) or, per hidden state, the norm of the trained
    translator (0 for layers left out); ``meta["lens"]`` holds the lens's info and folder."""
    from lmscope.data import load_corpus

    text = load_corpus(corpus) if isinstance(corpus, str) else corpus
    chosen = [item.strip() for item in (config.layers or "").split(",") if item.strip()] or None
    rank = int(os.environ.get("RANK", "0"))
    lens = train_tuned_lens(model, text, config.train_config(), layers=chosen, progress=rank == 0)
    info = {**lens.info, "path": str(config.out_dir)}
    if rank == 0:
        lens.save(config.out_dir)
    if config.eval_tokens and rank == 0:
        result = evaluate_lens(model, lens, text, tokens=config.eval_tokens, context=config.context, progress=True)
        result.meta["lens"] = info
        return result
    norms = torch.tensor([float(t.weight.detach().norm()) for t in lens.translators] + [0.0])
    return Result(norms, (Axis("layer", layer_labels(model.spec.n_layers)),), "train_lens", model.name,
                  params={"tokens": config.tokens, "context": config.context, "batch": config.batch,
                          "optimizer": config.optimizer, "seed": config.seed}, meta={"lens": info})


@dataclass(frozen=True)
class EvalLensConfig:
    """Options of :func:`eval_lens`."""

    lens_path: str | None = specs.option(None, "Tuned lens folder (default: logit lens only).", flags=("--lens",))
    tokens: int = specs.option(4096, "Held-out tokens.")
    context: int = specs.option(128, "Tokens per context.")

    def __post_init__(self):
        if self.tokens < 1 or self.context < 2:
            raise InputError("--tokens must be positive and --context at least 2.")


def eval_lens(model: Model, corpus, config: EvalLensConfig) -> Result:
    """Held-out KL to the final distribution and next-token CE per layer, tuned lens beside the logit lens."""
    lens = None if config.lens_path is None else TunedLens.load(config.lens_path, model)
    return evaluate_lens(model, lens, corpus, tokens=config.tokens, context=config.context, progress=True)


specs.register(specs.MethodSpec("lens-train", "decoding", "corpus", TrainLensConfig, train_lens,
                                sites=("resid_post",), cli=("lens", "train")))
specs.register(specs.MethodSpec("lens-eval", "decoding", "corpus", EvalLensConfig, eval_lens,
                                sites=("resid_post",), cli=("lens", "eval")))
