"""The shared shape of every sparse autoencoder: config base, parameters, normalisation, decoder constraints.

An SAE maps an activation ``x`` (d_in) to sparse features ``f`` (d_sae) and back: ``x̂ = f W_dec + b_dec``.
Weights use SAELens's layout, so files load there unchanged: ``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)``
(rows are feature directions), ``b_enc (d_sae)``, ``b_dec (d_in)``.

Input normalisation (Anthropic, April 2024): inputs are multiplied by one constant ``scale`` so that
``E‖x‖² = d_in`` in training. The public :meth:`SAE.encode` / :meth:`SAE.decode` take and return raw
activations; ``loss`` works in the normalised space. Saving folds ``scale`` into the weights
(``W_enc·s``, ``W_dec/s``, ``b_dec/s``), which leaves features unchanged.

Each architecture lives in its own module (relu.py, gated.py, topk.py, jumprelu.py) with a frozen config.
Shapes: B tokens (rows), D = d_in, F = d_sae.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from lmscope.errors import InputError


def typical_mask(x: torch.Tensor, max_norm_ratio: float | None) -> torch.Tensor:
    """Mask (...,) of the vectors of ``x`` whose norm is at most ``max_norm_ratio`` × their median norm (all when
    None): leaves out the "massive activations" of attention-sink tokens, which in SmolLM2's residual stream reach
    ~100× the median norm and would set the input scale and every reconstruction metric."""
    norms = x.norm(dim=-1)
    if not max_norm_ratio:
        return torch.ones_like(norms, dtype=torch.bool)
    if max_norm_ratio <= 1:
        raise InputError(f"max_norm_ratio={max_norm_ratio}: give a multiple of the median norm above 1 (e.g. 10).")
    return norms <= max_norm_ratio * norms.flatten().median()


@dataclass(frozen=True)
class SAEConfig:
    """Fields every architecture shares. ``site``/``model`` say where the SAE reads (lmscope site name)."""

    d_in: int
    d_sae: int
    site: str = ""
    model: str = ""
    d_head: int = 0          # width of one head for attn.z sites (the input is H*dh flattened), else 0
    seed: int = 0

    arch: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise InputError(f"SAE widths must be positive, got d_in={self.d_in}, d_sae={self.d_sae}.")
        if self.d_head and self.d_in % self.d_head:
            raise InputError(f"d_in={self.d_in} is not a multiple of d_head={self.d_head}.")

    def to_dict(self) -> dict:
        return {"arch": self.arch, **asdict(self)}


@dataclass
class LossOut:
    """One training step's loss, its named parts (floats, for logging) and the features (B, F)."""

    loss: torch.Tensor
    parts: dict[str, float]
    f: torch.Tensor


class SAE(nn.Module):
    """Base class: parameters shared by all architectures, normalisation and decoder-norm handling."""

    cfg: SAEConfig
    #: whether decoder rows are kept at unit norm (gradient projection before, renormalisation after a step)
    unit_norm_decoder: bool = True
    #: whether b_dec is subtracted from the input before encoding
    apply_b_dec_to_input: bool = True
    #: name of the sparsity coefficient in the config (warmed up by the trainer)
    coeff_name: str = ""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        d, m = cfg.d_in, cfg.d_sae
        w_dec = torch.randn(m, d, generator=g)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec * self.init_decoder_norm())
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous() * self.init_decoder_norm())
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("scale", torch.ones(()))

    # ---------------------------------------------------------------- architecture hooks
    def init_decoder_norm(self) -> float:
        return 1.0

    @property
    def coeff(self) -> float:
        return float(getattr(self.cfg, self.coeff_name)) if self.coeff_name else 0.0

    def encode_n(self, x_BD: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Features of normalised inputs (B, D) -> (B, F)."""
        raise NotImplementedError

    def loss(self, x_BD: torch.Tensor, coeff: float | None = None, *, dead_F: torch.Tensor | None = None,
             mse_scale: float = 1.0) -> LossOut:  # pragma: no cover - abstract
        """The architecture's training loss on normalised inputs (mean over the batch)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared maths
    def sae_in(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD - self.b_dec if self.apply_b_dec_to_input else x_BD

    def decode_n(self, f_BF: torch.Tensor) -> torch.Tensor:
        return f_BF @ self.W_dec + self.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Features of raw activations (..., D) -> (..., F)."""
        self._check_width(x)
        return self.encode_n(x.to(self.W_enc.dtype) * self.scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of features (..., F) -> (..., D)."""
        return self.decode_n(f) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise InputError(
                f"This SAE reads {self.cfg.d_in}-wide activations (site {self.cfg.site or '?'}), but got width "
                f"{x.shape[-1]}. Use an SAE trained on this model and site."
            )

    # ---------------------------------------------------------------- decoder constraint
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the part of each decoder row's gradient parallel to the row (before the optimiser step)."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Renormalise decoder rows to unit norm (after the optimiser step)."""
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    # ---------------------------------------------------------------- folding for files
    @torch.no_grad()
    def fold_scale(self) -> None:
        """Fold the input scale into the weights so that the SAE takes raw inputs with scale 1."""
        s = float(self.scale)
        self.W_enc *= s
        self.W_dec /= s
        self.b_dec /= s
        self.scale.fill_(1.0)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Architecture tensors beyond W_enc/W_dec/b_dec, by their SAELens names."""
        return {}
