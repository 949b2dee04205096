"""Training SAEs from an activation store: schedules, dead latents, checkpoints, resume, data parallelism.

``train(sae, source, TrainConfig(tokens=...), out_dir)`` streams shuffled batches from ``source`` (anything
with ``d``, ``len()`` and ``batches(batch_size, shuffle=, seed=, epochs=)`` yielding ``(B, D)`` tensors:
:class:`lmscope.data.ActivationStore`, or :class:`TensorSource` for in-memory data), and runs Adam with

* a linear LR warm-up and a linear decay to 0 over the last ``lr_decay`` fraction of steps (Anthropic 2024),
* a linear warm-up of the sparsity coefficient (λ) from 0 over the first ``coeff_warmup`` fraction
  (``schedule="constant"`` switches all three off: constant LR and λ from the first step),
* decoder-gradient projection before and renormalisation after each step (unit-norm architectures),
  gradient-norm clipping,
* dead-latent tracking (tokens since each latent last fired; feeds TopK's AuxK) and, for the unit-norm ReLU
  SAE, Anthropic's resampling of latents that did not fire since the last resample.

Initialisation from data: the input scale (``E‖x‖² = d``), b_dec at the geometric median (architectures that
subtract it), and TopK's ``mse_scale = 1/E‖x − E x‖²``. ``init_scale=False`` keeps the SAE's own input scale
and ``init_b_dec=False`` its own b_dec (e.g. an SAE initialised elsewhere, or a scale shared across layers).

Checkpoints (``checkpoint.safetensors``, atomic; the non-tensor state is JSON in its metadata, so nothing is
unpickled on resume) hold everything the next step depends on, and the batch order is a pure function of the
seed, so a run killed at any point and restarted with the same arguments ends with the same weights as an
uninterrupted run. Non-finite activations (in the initial sample or in a batch) or a non-finite loss stop the
run before anything is written, with an error that says which of the two it was.

Data parallel: launched under ``torchrun`` (or any initialised ``torch.distributed`` group), every process
reads the same global batch, computes the loss on its rows ``rank::world`` and gradients are averaged with an
all-reduce before the step (what DDP does), so 2 processes follow the 1-process run up to float rounding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as save_tensors
from tqdm.auto import tqdm

from lmscope.errors import InputError, LmscopeError
from lmscope.results import atomic_write_bytes
from lmscope.sae.base import SAE, typical_mask
from lmscope.sae.io import save_sae

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"   # pickled checkpoints of earlier versions: refused, never unpickled
CHECKPOINT_FORMAT = "lmscope-sae-checkpoint/1"
SCHEDULES = ("warmup_decay", "constant")
_META_KEY = "lmscope"
_STATE_TENSORS = ("since_fired", "fired_window")


class TrainingError(LmscopeError):
    """Training stopped (diverged or bad checkpoint); the last good checkpoint is left untouched."""


@dataclass(frozen=True)
class TrainConfig:
    tokens: int
    batch_size: int = 4096
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup: float = 0.01
    lr_decay: float = 0.2
    coeff_warmup: float = 0.05
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    init_sample: int = 16384
    dead_tokens: int = 1_000_000  # the TopK paper's AuxK window is 10M tokens; see lmscope.sae.topk
    resample_every: int = 0
    max_resamples: int = 4
    log_every: int = 20
    seed: int = 0
    schedule: str = "warmup_decay"  # "constant": no LR warm-up or decay, no λ warm-up
    init_scale: bool = True  # False: keep the SAE's own input scale
    init_b_dec: bool = True  # False: keep the SAE's own b_dec

    def __post_init__(self) -> None:
        if self.tokens < self.batch_size or self.batch_size <= 0:
            raise InputError(f"TrainConfig: tokens ({self.tokens}) must be ≥ batch_size ({self.batch_size}) > 0.")
        if self.schedule not in SCHEDULES:
            raise InputError(f"TrainConfig.schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}.")
        for name in ("lr_warmup", "lr_decay", "coeff_warmup"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"TrainConfig.{name} is a fraction of the run; got {getattr(self, name)}.")
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size


class TensorSource:
    """An in-memory activation source with the ActivationStore's batch interface."""

    def __init__(self, acts: torch.Tensor):
        self.acts = acts.reshape(-1, acts.shape[-1]).float()
        self.d = self.acts.shape[1]

    @classmethod
    def from_store(cls, store, *, max_rows: int | None = None, max_norm_ratio: float | None = None) -> TensorSource:
        """Load an activation store's rows (in stored order) into memory.

        ``max_norm_ratio`` leaves out rows whose norm exceeds that multiple of the median row norm
        (:func:`~lmscope.sae.base.typical_mask`; in SmolLM2's layer-15 residual about one context in fifty has
        a second-position token at ~100× the median norm).
        """
        parts, got = [], 0
        for x in store.batches(32768, shuffle=False):
            parts.append(x.float())
            got += x.shape[0]
            if max_rows is not None and got >= max_rows:
                break
        if not parts:
            raise InputError("The activation store is empty; harvest activations first.")
        acts = torch.cat(parts)[:max_rows]
        return cls(acts[typical_mask(acts, max_norm_ratio)])

    def __len__(self) -> int:
        return self.acts.shape[0]

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1) -> Iterator[torch.Tensor]:
        n = len(self)
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            for i in range(0, n - batch_size + 1, batch_size):
                yield self.acts[order[i:i + batch_size]]


@dataclass
class TrainState:
    step: int = 0
    mse_scale: float = 1.0
    since_fired: torch.Tensor | None = None     # (F,) tokens since each latent last fired
    fired_window: torch.Tensor | None = None    # (F,) firings since the last resample
    resamples: int = 0
    history: list[dict] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def geometric_median(x_ND: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x."""
    y = x_ND.mean(0)
    for _ in range(iters):
        w = 1.0 / (x_ND - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x_ND).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


def _batches(source, cfg: TrainConfig) -> Iterator[torch.Tensor]:
    per_epoch = len(source) // cfg.batch_size
    if per_epoch == 0:
        raise InputError(f"The activation source holds {len(source)} rows, fewer than one batch of {cfg.batch_size}.")
    epochs = math.ceil(cfg.steps / per_epoch)
    for x in source.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs):
        if x.shape[0] == cfg.batch_size:
            yield x.float()


@torch.no_grad()
def init_from_data(sae: SAE, source, cfg: TrainConfig) -> float:
    """Set the input scale and b_dec from a data sample; returns TopK's mse_scale."""
    if source.d != sae.cfg.d_in:
        raise InputError(f"The activations are {source.d} wide but the SAE reads {sae.cfg.d_in}; build the SAE "
                         f"with d_in={source.d}.")
    n = min(cfg.init_sample, len(source))
    bs = min(n, 4096)
    rows, got = [], 0
    for x in source.batches(bs, shuffle=True, seed=cfg.seed + 7_919, epochs=1):
        rows.append(x.float())
        got += x.shape[0]
        if got >= n:
            break
    sample = torch.cat(rows)[:n]
    _check_finite(sample, "the initial sample")
    if cfg.init_scale:
        sae.scale.fill_(math.sqrt(sae.cfg.d_in / sample.pow(2).sum(1).mean().clamp_min(1e-12).item()))
    sample = sample * sae.scale
    if sae.apply_b_dec_to_input and cfg.init_b_dec:
        sae.b_dec.copy_(geometric_median(sample))
    return 1.0 / (sample - sample.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12).item()


def _check_finite(x_ND: torch.Tensor, where: str) -> None:
    bad = ~torch.isfinite(x_ND).all(dim=-1)
    if bool(bad.any()):
        raise TrainingError(f"The activation data holds NaN or infinite values ({int(bad.sum())} of {x_ND.shape[0]} "
                            f"rows in {where}); the data is broken, not the training settings. Harvest the store "
                            "again (with a float32 model), or leave those rows out. The last good checkpoint, if any, "
                            "was kept.")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.schedule == "constant":
        return 1.0
    n = cfg.steps
    warm = max(1, round(cfg.lr_warmup * n)) if cfg.lr_warmup else 0
    if warm and step < warm:
        return (step + 1) / warm
    decay_start = n - round(cfg.lr_decay * n)
    if cfg.lr_decay and step >= decay_start:
        return max(0.0, (n - step) / max(1, n - decay_start))
    return 1.0


def _coeff_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.schedule == "constant":
        return 1.0
    warm = round(cfg.coeff_warmup * cfg.steps)
    return min(1.0, (step + 1) / warm) if warm else 1.0


@torch.no_grad()
def resample_dead(sae: SAE, opt: torch.optim.Adam, x_BD: torch.Tensor, dead_F: torch.Tensor, seed: int) -> int:
    """Anthropic's resampling: dead latents take inputs sampled with probability ∝ loss² (normalised x)."""
    idx = dead_F.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    err = (sae.decode_n(sae.encode_n(x_BD)) - x_BD).pow(2).sum(-1)
    g = torch.Generator().manual_seed(seed)
    pick = torch.multinomial(err.pow(2) + 1e-12, idx.numel(), replacement=True, generator=g)
    d = sae.sae_in(x_BD[pick])
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive = ~dead_F
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = d
    sae.W_enc[:, idx] = (d * enc_norm * 0.2).T
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        st = opt.state.get(p)
        if st:
            st["exp_avg"][sl] = 0.0
            st["exp_avg_sq"][sl] = 0.0
    return int(idx.numel())


def _save_checkpoint(path: Path, sae: SAE, opt, state: TrainState, cfg: TrainConfig) -> None:
    """One safetensors file: the tensors, plus everything else as JSON in its metadata (nothing pickled)."""
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    opt_sd = opt.state_dict()
    opt_scalars: dict[str, dict] = {}
    for pid, entries in opt_sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                opt_scalars.setdefault(str(pid), {})[key] = value
    plain = asdict(state)
    for key in _STATE_TENSORS:
        value = plain.pop(key)
        if value is not None:
            tensors[f"state.{key}"] = value
    doc = {"format": CHECKPOINT_FORMAT, "sae_config": sae.cfg.to_dict(), "train_config": asdict(cfg),
           "opt_param_groups": opt_sd["param_groups"], "opt_scalars": opt_scalars, "state": plain}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save_tensors(tensors, metadata={_META_KEY: json.dumps(doc)}))


_ADDED_DEFAULTS = {"schedule": "warmup_decay", "init_scale": True, "init_b_dec": True}


def _load_checkpoint(path: Path, sae: SAE, opt, cfg: TrainConfig) -> TrainState:
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if doc.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TrainingError(f"The checkpoint {path} is corrupted or not an lmscope SAE checkpoint ({err}). "
                            "Delete it to start over, or point --out at another folder.") from None
    # JSON turns tuples into lists: compare through the same round trip; options added since (at their defaults)
    # are absent from older checkpoints
    saved_cfg = {**_ADDED_DEFAULTS, **doc["train_config"]}
    if doc["sae_config"] != json.loads(json.dumps(sae.cfg.to_dict())) or \
            saved_cfg != json.loads(json.dumps(asdict(cfg))):
        raise TrainingError(f"The checkpoint {path} was written by a run with other settings "
                            f"({doc['sae_config']}, {doc['train_config']}). Resume with the same arguments or use "
                            "another output folder.")
    try:
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        opt_state: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, pid, key = name.split(".", 2)
                opt_state.setdefault(int(pid), {})[key] = value
        for pid, entries in doc["opt_scalars"].items():
            opt_state.setdefault(int(pid), {}).update(entries)
        opt.load_state_dict({"state": opt_state, "param_groups": doc["opt_param_groups"]})
        state = TrainState(**doc["state"], **{k: tensors.get(f"state.{k}") for k in _STATE_TENSORS})
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise TrainingError(f"The checkpoint {path} is incomplete or damaged ({type(err).__name__}: {err}). "
                            "Delete it to start over, or point --out at another folder.") from None
    return state


def _all_reduce_(t: torch.Tensor, world: int, mean: bool = False) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
        if mean:
            t /= world
    return t


def train(sae: SAE, source, cfg: TrainConfig, out_dir: str | os.PathLike | None = None, *,
          progress: bool = True, resume: bool = True) -> TrainState:
    """Train ``sae`` in place on ``source``; with ``out_dir``, checkpoint there and write the SAE files at the end.

    Returns the final :class:`TrainState` (``history`` has loss, L0, FVE, lr and λ every ``log_every`` steps).
    """
    rank, world = _world()
    if cfg.batch_size % world:
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world}).")
    out = Path(out_dir) if out_dir is not None else None
    ck_path = out / CHECKPOINT if out is not None else None
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas)
    if out is not None and resume and (out / LEGACY_CHECKPOINT).exists() and not ck_path.exists():
        raise TrainingError(f"{out / LEGACY_CHECKPOINT} is a pickled checkpoint of an older lmscope; it is not read "
                            "(unpickling a file can run code). Delete it to start over, or point --out at another "
                            "folder.")
    if ck_path is not None and resume and ck_path.exists():
        state = _load_checkpoint(ck_path, sae, opt, cfg)
    else:
        state = TrainState(mse_scale=init_from_data(sae, source, cfg))
        sae.normalise_decoder()
    F = sae.cfg.d_sae
    if state.since_fired is None:
        state.since_fired = torch.zeros(F, dtype=torch.long)
        state.fired_window = torch.zeros(F, dtype=torch.long)
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    n_steps = cfg.steps
    batches = _batches(source, cfg)
    for _ in range(state.step):  # replay the batch order up to the checkpoint
        next(batches)
    bar = tqdm(total=n_steps, initial=state.step, desc=f"train {sae.cfg.arch} SAE",
               disable=not progress or rank != 0, dynamic_ncols=True)
    resample_on = cfg.resample_every and getattr(sae, "unit_norm_decoder", False) and sae.cfg.arch == "relu"
    while state.step < n_steps:
        try:
            x = next(batches)
        except StopIteration:
            raise TrainingError(f"The activation source ran out after {state.step} steps; it holds {len(source)} "
                                f"rows for {cfg.tokens} tokens. Harvest more or lower --tokens.") from None
        _check_finite(x, f"the batch of step {state.step}")
        x = x * sae.scale
        step = state.step
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        coeff = sae.coeff * _coeff_factor(step, cfg)
        shard = x[rank::world] if world > 1 else x
        dead = state.since_fired >= cfg.dead_tokens
        out_ = sae.loss(shard, coeff, dead_F=dead, mse_scale=state.mse_scale)
        if not torch.isfinite(out_.loss):
            raise TrainingError(f"The loss became {out_.loss.detach().item()} at step {step}; the run stopped and the last "
                                "good checkpoint was kept. Lower the learning rate or the sparsity coefficient.")
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        if world > 1:
            for p in sae.parameters():
                if p.grad is not None:
                    _all_reduce_(p.grad, world, mean=True)
        sae.project_decoder_grad()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.normalise_decoder()
        with torch.no_grad():
            fired = _all_reduce_((out_.f > 0).sum(0).long(), world)
            state.since_fired = torch.where(fired > 0, 0, state.since_fired + cfg.batch_size)
            state.fired_window += fired
        state.step += 1
        if resample_on and state.step % cfg.resample_every == 0 and state.resamples < cfg.max_resamples:
            resample_dead(sae, opt, x, state.fired_window == 0, seed=cfg.seed * 1_000_003 + state.step)
            state.fired_window.zero_()
            state.resamples += 1
        if state.step % cfg.log_every == 0 or state.step == n_steps:
            with torch.no_grad():
                stats = torch.tensor([out_.loss.detach().item(), float((out_.f > 0).sum(-1).float().mean()),
                                      out_.parts["mse"], float((shard - shard.mean(0)).pow(2).sum(-1).mean())])
                _all_reduce_(stats, world, mean=True)
            row = {"step": state.step, "loss": stats[0].item(), "l0": stats[1].item(),
                   "fve": 1 - stats[2].item() / max(stats[3].item(), 1e-12), "lr": opt.param_groups[0]["lr"],
                   "coeff": coeff, "dead_frac": float(dead.float().mean())}
            state.history.append(row)
            bar.set_postfix(L0=f"{row['l0']:.1f}", FVE=f"{row['fve']:.3f}", loss=f"{row['loss']:.3g}")
        bar.update(1)
        if ck_path is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
                and state.step < n_steps:
            if rank == 0:
                _save_checkpoint(ck_path, sae, opt, state, cfg)
            if world > 1:
                dist.barrier()
    bar.close()
    if out is not None and rank == 0:
        _save_checkpoint(ck_path, sae, opt, state, cfg)
        save_sae(sae, out, extra={"train_config": asdict(cfg), "tokens": state.step * cfg.batch_size})
        atomic_write_bytes(out / "training_log.json", json.dumps(state.history, indent=1).encode())
    if world > 1:
        dist.barrier()
    return state
