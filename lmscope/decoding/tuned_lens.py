"""Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

The logit lens decodes a hidden state h^l with the model's final norm and unembedding. The tuned
lens first applies a learned affine translator per layer, parameterised residually:

    logits_l = W_U · Norm_f(h^l + A_l h^l + b_l),      A_l = 0, b_l = 0 at initialisation,

so an untrained lens *is* the logit lens, and weight decay pulls it back towards it. The
translators are trained to minimise KL(p_final || p_l) over tokens of a text corpus (no token
shift), with the final norm and unembedding frozen. Hidden states are indexed like the logit
lens: "embed" (the input of block 0) and the output of each block; the last block's output is
the model's own prediction and needs no translator.

Training runs in one process or data-parallel across processes started by ``torchrun``
(torch.distributed with gloo on CPU, DDP): each rank takes an equal share of every global batch
and DDP averages the gradients, so the result equals a one-process run on the same data and
seed. Optimisers: the reference recipe (``optimizer="sgd"``: Nesterov momentum 0.9,
lr = lr_scale·(1−0.9), weight decay 1e-3, linear decay to zero) and AdamW (the default; lr 1e-4,
short warm-up, linear decay), which is stable at the small budgets a CPU affords.

A least-squares start (:mod:`lmscope.decoding.lens_fit`, Din et al. 2023: forward passes and second
moments only) costs a fraction of KL training, which runs the unembedding
forward and backward for every hidden state of every token; ``train_tuned_lens(init=...)`` fine-tunes it.

Shapes: hidden states (..., D); translators (D, D) + (D,) per hidden state 0..n_layers−1; logits (..., V).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from lmscope.errors import InputError
from lmscope.results import Axis, Result, atomic_write_bytes
from lmscope.sites import resolve_count, resolve_position

WEIGHTS = "tuned_lens.safetensors"
CONFIG = "tuned_lens.json"
LENS_FORMAT = "lmscope-tuned-lens/1"


def layer_labels(n_layers: int) -> tuple[str, ...]:
    """Labels of the n_layers + 1 hidden states: "embed", "0", ..., str(n_layers - 1)."""
    return ("embed", *(str(layer) for layer in range(n_layers)))


def hidden_sites(n_layers: int) -> list[str]:
    """The site of each hidden state, in lens order."""
    return ["blocks.0.resid_pre", *(f"blocks.{layer}.resid_post" for layer in range(n_layers))]


def parse_layers(layers, n_layers: int) -> tuple[int, ...]:
    """Hidden-state indices (0 = embed, l + 1 = output of block l) of the translators to train.

    Accepts labels ("embed", "3", -1) as in the logit lens; the last block's output has no translator.
    """
    if layers is None:
        return tuple(range(n_layers))
    out = []
    for item in layers:
        if str(item) == "embed":
            out.append(0)
            continue
        try:
            layer = int(item)
        except ValueError:
            raise InputError(f"Layer {item!r} is not a number or 'embed'.") from None
        layer = layer + n_layers if layer < 0 else layer
        if not 0 <= layer < n_layers:
            raise InputError(f"Layer {item} is out of range: the model has {n_layers} layers (0..{n_layers - 1}, "
                             "or 'embed').")
        if layer == n_layers - 1:
            raise InputError(f"Layer {item} is the last block: its output is the model's own prediction and has no "
                             f"translator. Choose layers 'embed', 0..{n_layers - 2}.")
        out.append(layer + 1)
    return tuple(sorted(set(out)))


def model_fingerprint(model) -> str:
    """A short hash of the model's unembedding and final norm (what a lens depends on)."""
    h = hashlib.sha256()
    h.update(str((model.spec.d_model, model.spec.d_vocab, model.spec.n_layers)).encode())
    h.update(model.W_U[:, :64].detach().float().cpu().contiguous().numpy().tobytes())
    h.update(model.norm_weight("ln_final").detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def decode(model, x: torch.Tensor) -> torch.Tensor:
    """Logits (..., V) of hidden states x (..., D) through the frozen final norm and unembedding.

    Gradients flow to ``x`` only; the model's parameters are used detached (nothing accumulates in them).
    """
    return model.unembed(x, grad=True)


class TunedLens(nn.Module):
    """One residual affine translator per hidden state 0..n_layers−1 (embed and blocks 0..n−2).

    ``translate(h, i)`` returns h + A_i h + b_i; ``forward(hs)`` does so for stacked hidden
    states (k, N, D) at ``self.trained`` indices (used by training, where DDP wraps it).
    """

    def __init__(self, d_model: int, n_layers: int, model_name: str = "", fingerprint: str = "",
                 trained: tuple[int, ...] | None = None):
        super().__init__()
        self.d_model, self.n_layers = d_model, n_layers
        self.model_name, self.fingerprint = model_name, fingerprint
        self.trained = tuple(range(n_layers)) if trained is None else tuple(trained)
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        for i, t in enumerate(self.translators):  # untrained translators stay zero (= logit lens) and frozen
            t.requires_grad_(i in self.trained)
        self.info: dict = {}

    @classmethod
    def for_model(cls, model, layers=None) -> TunedLens:
        """A zero (identity) lens for ``model``: equal to the logit lens until trained."""
        s = model.spec
        return cls(s.d_model, s.n_layers, model.name, model_fingerprint(model), parse_layers(layers, s.n_layers))

    def translate(self, h: torch.Tensor, index: int) -> torch.Tensor:
        """h (..., D) at hidden-state ``index`` (0 = embed); the last index (n_layers) is returned as is."""
        if not 0 <= index <= self.n_layers:
            raise InputError(f"Hidden-state index {index} is out of range 0..{self.n_layers}.")
        if index == self.n_layers:
            return h
        t = self.translators[index]
        return h + t(h.to(t.weight.dtype)).to(h.dtype)

    def forward(self, hs: torch.Tensor) -> torch.Tensor:
        """Translate stacked hidden states (k, N, D), one per index of ``self.trained``."""
        return torch.stack([self.translate(h, i) for h, i in zip(hs, self.trained)])

    def check_model(self, model) -> None:
        """Raise InputError unless this lens was trained for ``model``."""
        s = model.spec
        if (s.d_model, s.n_layers) != (self.d_model, self.n_layers) or (
                self.fingerprint and self.fingerprint != model_fingerprint(model)):
            raise InputError(f"This tuned lens was trained for {self.model_name!r} (d_model {self.d_model}, "
                             f"{self.n_layers} layers), not for {model.name!r} (d_model {s.d_model}, {s.n_layers} "
                             "layers, or different unembedding weights). Train one for this model with "
                             "`lmscope lens train`.")

    def save(self, out_dir: str | Path) -> Path:
        """Write ``tuned_lens.safetensors`` and ``tuned_lens.json`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(out / WEIGHTS, save_tensors(tensors))
        cfg = {"format": LENS_FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
               "d_model": self.d_model, "n_layers": self.n_layers, "trained": list(self.trained), "info": self.info}
        atomic_write_bytes(out / CONFIG, json.dumps(cfg, indent=1).encode())
        return out

    @classmethod
    def load(cls, path: str | Path, model=None) -> TunedLens:
        """Read a saved lens (folder or its json); with ``model``, check that it was trained for it."""
        path = Path(path)
        folder = path.parent if path.suffix in (".json", ".safetensors") else path
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise InputError(f"{path} holds no tuned lens ({CONFIG} and {WEIGHTS}); train one with "
                             "`lmscope lens train --out DIR`.")
        try:
            cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
            if not isinstance(cfg, dict) or cfg.get("format", LENS_FORMAT) != LENS_FORMAT:
                raise ValueError(f"not an lmscope tuned-lens config (format {LENS_FORMAT!r})")
            lens = cls(int(cfg["d_model"]), int(cfg["n_layers"]), cfg["model"], cfg["fingerprint"],
                       tuple(cfg["trained"]))
            lens.load_state_dict(load_file(folder / WEIGHTS))
        except Exception as err:  # noqa: BLE001 - JSON, key, shape and safetensors errors mean the same here
            raise InputError(f"{folder} is not a readable tuned lens ({type(err).__name__}: {err}); train it again "
                             "with `lmscope lens train --out DIR`.") from None
        lens.info = cfg.get("info", {})
        if model is not None:
            lens.check_model(model)
        return lens


@dataclass(frozen=True)
class TunedLensConfig:
    """Training options. ``tokens`` is the total budget (steps = tokens // (batch_contexts·context)).

    ``optimizer="sgd"`` is the reference recipe (Nesterov momentum, lr = lr_scale·(1 − momentum),
    linear decay); ``"adam"`` (AdamW, lr 1e-4 by default, warm-up over min(1000, steps/5) steps,
    then linear decay) is the default here: SmolLM2's late residuals have norms of several hundred,
    so an SGD step on A (∝ ‖h‖²) overshoots, and Adam at 1e-3 moved late layers past the logit lens
    in a short run.
    """

    tokens: int = 2**18
    context: int = 128
    batch_contexts: int = 8
    optimizer: str = "adam"
    lr: float | None = None
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    seed: int = 0
    chunk_tokens: int = 512

    def __post_init__(self):
        if self.tokens < self.context * self.batch_contexts:
            raise InputError(f"tokens={self.tokens} is less than one batch ({self.batch_contexts} contexts of "
                             f"{self.context}); give more tokens.")
        if self.optimizer not in ("sgd", "adam"):
            raise InputError(f"optimizer={self.optimizer!r}: use 'sgd' or 'adam'.")
        if not 0 <= self.momentum < 1 or self.lr_scale <= 0 or self.chunk_tokens < 1 or (self.lr or 1) <= 0:
            raise InputError("momentum must be in [0, 1); lr, lr_scale and chunk_tokens positive.")

    @property
    def steps(self) -> int:
        return self.tokens // (self.context * self.batch_contexts)

    def make_optimizer(self, params, steps: int):
        """The optimizer and its per-step learning-rate schedule."""
        if self.optimizer == "sgd":
            lr = self.lr if self.lr is not None else self.lr_scale * (1 - self.momentum)
            opt = torch.optim.SGD(params, lr=lr, momentum=self.momentum, nesterov=self.momentum > 0,
                                  weight_decay=self.weight_decay)
            warmup = 0
        else:
            opt = torch.optim.AdamW(params, lr=self.lr if self.lr is not None else 1e-4,
                                    weight_decay=self.weight_decay)
            warmup = min(1000, steps // 5)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 1 - (step - warmup) / max(1, steps - warmup)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _hidden_and_target(model, ids: torch.Tensor, indices: tuple[int, ...]):
    """Stacked hidden states (k, N, D) at ``indices`` and final log-probs (N, V), first position dropped."""
    sites = hidden_sites(model.spec.n_layers)
    run = model.run(ids, cache=[sites[i] for i in indices], logits="all")
    hs = torch.stack([run[sites[i]][:, 1:].reshape(-1, model.spec.d_model) for i in indices])
    target = run.logits[:, 1:].reshape(-1, run.logits.shape[-1]).float().log_softmax(-1)
    return hs, target


def _kl_backward(p_target: torch.Tensor, logits: torch.Tensor, weight: float) -> float:
    """Backpropagate ``weight`` · Σ_tokens KL(p_target || softmax(logits)) from logits (N, V); return the
    un-weighted sum of the cross-entropy part, Σ (logsumexp(z) − p·z) (KL = that + Σ p log p).

    The gradient of the KL with respect to the logits is softmax(z) − p, so it is formed directly
    (one exp over the vocabulary, no log-softmax graph kept) and passed to ``logits.backward``:
    autograd only runs the unembedding and final norm backward, to the translated hidden states.
    """
    with torch.no_grad():
        z = logits.detach()
        lse = z.logsumexp(-1, keepdim=True)
        cross = float(lse.sum()) - float(torch.dot(p_target.reshape(-1), z.reshape(-1)))
        grad = z.sub(lse).exp_().sub_(p_target).mul_(weight)
    logits.backward(grad)
    return cross


def train_tuned_lens(model, corpus="default", config: TunedLensConfig = TunedLensConfig(), *, layers=None,
                     contexts: torch.Tensor | None = None, init: TunedLens | None = None,
                     progress: bool = True) -> TunedLens:
    """Train a tuned lens for ``model`` on the train split of ``corpus`` (or on given (N, T) ``contexts``).

    Training starts from zero translators (the logit lens) or, with ``init``, from a copy of that lens
    (e.g. the least-squares fit of :func:`lmscope.decoding.lens_fit.fit_lens_least_squares`; ``init``
    itself is left unchanged, and its layers are the ones trained).

    Under ``torchrun`` (torch.distributed initialised, or WORLD_SIZE > 1 in the environment: then a
    gloo process group is created), every rank must see the same data; each takes an equal slice
    of every global batch and DDP averages gradients. Every rank returns the same lens.
    """
    import torch.distributed as dist

    from lmscope.data import token_contexts

    created = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if created:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if config.batch_contexts % world:
        raise InputError(f"batch_contexts={config.batch_contexts} must be divisible by the {world} processes.")
    if contexts is None:
        contexts = token_contexts(model, corpus, config.context, "train", max_tokens=config.tokens)
    steps = min(config.steps, len(contexts) // config.batch_contexts)
    if steps < 1:
        raise InputError(f"{len(contexts)} contexts are fewer than one batch of {config.batch_contexts}.")

    torch.manual_seed(config.seed)
    lens = TunedLens.for_model(model, layers if init is None else [layer_labels(init.n_layers)[i]
                                                                    for i in init.trained])
    if init is not None:
        init.check_model(model)
        lens.load_state_dict(init.state_dict())
    module = nn.parallel.DistributedDataParallel(lens) if world > 1 else lens
    opt, sched = config.make_optimizer([p for p in lens.parameters() if p.requires_grad], steps)
    per_rank = config.batch_contexts // world
    losses = []
    bar = tqdm(range(steps), desc="tuned lens", unit="step", disable=not progress or rank != 0)
    for step in bar:
        batch = contexts[step * config.batch_contexts:(step + 1) * config.batch_contexts]
        mine = batch[rank * per_rank:(rank + 1) * per_rank]
        with torch.no_grad():  # one model forward per batch; targets shared by every translator
            hs, target = _hidden_and_target(model, mine, lens.trained)
            p_target = target.exp()
            neg_entropy = float((p_target * target).sum())
        translated = module(hs)
        leaf = translated.detach().requires_grad_()
        n_tok = target.shape[0]
        total = 0.0
        for k in range(len(lens.trained)):
            for lo in range(0, n_tok, config.chunk_tokens):
                hi = min(lo + config.chunk_tokens, n_tok)
                logits = decode(model, leaf[k, lo:hi])
                total += _kl_backward(p_target[lo:hi], logits, 1 / n_tok)
        total = (total + len(lens.trained) * neg_entropy) / n_tok
        opt.zero_grad(set_to_none=True)
        translated.backward(leaf.grad)  # DDP averages the translators' gradients across ranks here
        opt.step()
        sched.step()
        losses.append(total / len(lens.trained))
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    bar.close()
    if world > 1:
        # Tear down in the same order on every rank: all ranks meet at a barrier (none is still in
        # its last all-reduce), the DDP wrapper (whose reducer holds the process group) is released
        # while the group is alive, and only then is the group destroyed.
        dist.barrier()
        del module
        if created:
            dist.destroy_process_group()
    lens.info = {**({} if init is None else init.info), "config": asdict(config), "steps": steps, "world_size": world, "tokens_seen": steps *
                 config.batch_contexts * config.context, "mean_kl_per_step": losses}  # rank 0's share under DDP
    return lens


def evaluate_lens(model, lens: TunedLens | None = None, corpus="default", *, contexts: torch.Tensor | None = None,
                  tokens: int = 4096, context: int = 128, batch_contexts: int = 4,
                  progress: bool = False) -> Result:
    """Per-layer KL(p_final || p_lens) and next-token cross-entropy of the logit and tuned lens.

    On the held-out split of ``corpus`` (or given contexts), first position of each context left
    out. Values (n_layers + 1, 4): columns kl_logit, kl_tuned, ce_logit, ce_tuned (nats, mean per
    token); without a lens the tuned columns equal the logit ones. meta["ce_model"] is the model's CE.
    """
    if lens is not None:
        lens.check_model(model)
    if contexts is None:
        from lmscope.data import token_contexts

        contexts = token_contexts(model, corpus, context, "heldout", max_tokens=tokens)
    n = model.spec.n_layers
    indices = tuple(range(n + 1))
    sums = torch.zeros(n + 1, 4, dtype=torch.float64)
    n_kl = n_ce = 0
    ce_model = 0.0
    starts = range(0, len(contexts), batch_contexts)
    for b in tqdm(starts, desc="evaluate lens", disable=not progress):
        ids = contexts[b:b + batch_contexts]
        with torch.no_grad():
            hs, target = _hidden_and_target(model, ids, indices)
            t = ids.shape[1] - 1
            nxt = torch.cat([ids[:, 2:], torch.full((len(ids), 1), -100)], 1).reshape(-1)  # next token, -100: none
            valid = nxt != -100
            ce_model += float(F.nll_loss(target[valid], nxt[valid], reduction="sum"))
            for i in indices:
                for col, h in ((0, hs[i]), (1, hs[i] if lens is None else lens.translate(hs[i], i))):
                    logp = decode(model, h).log_softmax(-1)
                    sums[i, col] += float((target.exp() * (target - logp)).sum())
                    sums[i, col + 2] += float(F.nll_loss(logp[valid], nxt[valid], reduction="sum"))
            n_kl += len(ids) * t
            n_ce += int(valid.sum())
    values = torch.cat([sums[:, :2] / n_kl, sums[:, 2:] / n_ce], 1).float()
    return Result(values, (Axis("layer", layer_labels(n)), Axis("metric", ("kl_logit", "kl_tuned", "ce_logit",
                                                                             "ce_tuned"))),
                  "lens_eval", model.name, None, {"tokens": n_kl, "context": contexts.shape[1]}, {},
                  {"ce_model": ce_model / max(n_ce, 1), "lens": None if lens is None else lens.info.get("config")})


def tuned_lens(model, prompt: str, lens: TunedLens, target: str | int | None = None, *, k: int = 5,
               position: int | None = None) -> Result:
    """Like :func:`lmscope.decoding.logit_lens` (a layer × position grid; :func:`~lmscope.decoding.lens_top`
    views one position), with each hidden state passed through the tuned lens first."""
    from lmscope.decoding.logit_lens import lens_grid

    lens.check_model(model)
    sites = hidden_sites(model.spec.n_layers)
    run = model.run(prompt, cache=sites, logits="none")
    k = resolve_count(k, model.spec.d_vocab, "top tokens per layer")
    resolve_position(position, run.batch.input_ids.shape[1])  # checked now, used by lens_top
    with torch.no_grad():
        hs = torch.stack([lens.translate(run[s][0], i) for i, s in enumerate(sites)])  # (L + 1, T, D)
        return lens_grid(model, hs, lambda h: decode(model, h), run.batch.str_tokens[0], target, k, "tuned_lens",
                         {"position": position})
