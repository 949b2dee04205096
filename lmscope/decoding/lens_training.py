"""Training and evaluating a tuned lens as workflows: train on a corpus and save the lens to a folder
(also under ``torchrun``, data-parallel; only rank 0 writes), and evaluate held-out KL and cross-entropy per
layer beside the logit lens. The command line's ``lmscope lens train`` and ``lens eval`` run these specs.

Training has two stages: the least-squares translators of :mod:`lmscope.decoding.lens_fit` (forward
passes only, ``lstsq_tokens``), then KL fine-tuning from them (``tokens``; 0 keeps the least-squares
lens). With ``eval_tokens`` both stages are evaluated: the result's columns are the final lens's, and
``extras["kl_lstsq"]`` / ``extras["ce_lstsq"]`` hold the least-squares stage's KL and CE per layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.decoding.lens_fit import TARGETS, fit_lens_least_squares
from lmscope.decoding.tuned_lens import TunedLens, TunedLensConfig, evaluate_lens, layer_labels, train_tuned_lens
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result


@dataclass(frozen=True)
class TrainLensConfig:
    """Options of :func:`train_lens`."""

    tokens: int = specs.option(help="KL fine-tuning tokens (steps = tokens / (batch·context)); 0: least squares "
                                    "only.")
    out_dir: str = specs.option(help="Folder to write the lens to.", flags=("--out",))
    layers: str | None = specs.option(None, "Layers to train: 'embed', 0, 1, ... comma-separated; default all.")
    context: int = specs.option(128, "Tokens per context.")
    batch: int = specs.option(8, "Contexts per step (global, split across torchrun processes).")
    optimizer: str = specs.option("adam", "adam | sgd (the reference recipe).", choices=("adam", "sgd"))
    lr: float | None = specs.option(None, "Learning rate (default: adam 1e-4, sgd 0.1).")
    seed: int = specs.option(0, "Random seed.")
    eval_tokens: int = specs.option(0, "Also evaluate on this many held-out tokens (0: skip).")
    lstsq_tokens: int = specs.option(2**15, "Tokens for the least-squares start (forward passes only; 0: start at "
                                            "the logit lens).")
    lstsq_target: str = specs.option("raw", "Least-squares target: the last block's output as is (raw, Din et al.) "
                                            "or divided by its RMS (normed).", choices=TARGETS)
    ridge: float = specs.option(1e-4, "Least-squares ridge, relative to the mean variance of each layer's input.")

    def __post_init__(self):
        specs.check_config(self)
        if self.tokens < 0 or self.lstsq_tokens < 0 or self.ridge < 0 or self.eval_tokens < 0:
            raise InputError("--tokens, --lstsq-tokens, --eval-tokens and --ridge must not be negative.")
        if self.tokens == 0 and self.lstsq_tokens == 0:
            raise InputError("Nothing to train: give --tokens (KL fine-tuning) or --lstsq-tokens (least squares), or "
                             "both.")
        if self.tokens:
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
    start = None
    if config.lstsq_tokens:  # every rank fits the same least-squares start (same data, forward passes only)
        start = fit_lens_least_squares(model, text, tokens=config.lstsq_tokens, context=config.context,
                                       batch_contexts=config.batch, layers=chosen, ridge=config.ridge,
                                       target=config.lstsq_target, progress=rank == 0)
    if config.tokens:
        lens = train_tuned_lens(model, text, config.train_config(), layers=chosen, init=start, progress=rank == 0)
    else:
        lens = start
        lens.info = {**lens.info, "steps": 0, "world_size": 1, "tokens_seen": 0}
    info = {**lens.info, "path": str(config.out_dir)}
    if rank == 0:
        lens.save(config.out_dir)
    if config.eval_tokens and rank == 0:
        result = evaluate_lens(model, lens, text, tokens=config.eval_tokens, context=config.context, progress=True)
        result.meta["lens"] = info
        if start is not None and lens is not start:
            first = evaluate_lens(model, start, text, tokens=config.eval_tokens, context=config.context,
                                  progress=True)
            result.extras["kl_lstsq"], result.extras["ce_lstsq"] = first.values[:, 1], first.values[:, 3]
        return result
    norms = torch.tensor([float(t.weight.detach().norm()) for t in lens.translators] + [0.0])
    return Result(norms, (Axis("layer", layer_labels(model.spec.n_layers)),), "train_lens", model.name,
                  params={"tokens": config.tokens, "context": config.context, "batch": config.batch,
                          "optimizer": config.optimizer, "seed": config.seed, "lstsq_tokens": config.lstsq_tokens,
                          "lstsq_target": config.lstsq_target, "ridge": config.ridge}, meta={"lens": info})


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
