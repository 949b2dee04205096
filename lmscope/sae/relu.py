"""ReLU SAE: Bricken et al. 2023 ("Towards Monosemanticity") and Anthropic's April 2024 update.

``f = ReLU(W_encᵀ (x − b_dec) + b_enc)`` (the update drops the b_dec subtraction), ``x̂ = f W_dec + b_dec``.
Two conventions for keeping the L1 penalty honest (METHODS §11.1–11.2):

* ``decoder="weighted"`` (Anthropic 2024, default): ``L = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖``, no norm constraint,
  decoder rows start as random directions of norm 0.1, ``W_enc = W_decᵀ``, biases 0, no b_dec subtraction.
* ``decoder="unit_norm"`` (Bricken 2023): ``L = ‖x − x̂‖² + λ ‖f‖₁`` with unit-norm decoder rows (gradient
  projection before each step, renormalisation after), b_dec subtracted before encoding and initialised at
  the geometric median; dead latents are resampled (see training.py).

Use it as the baseline: it shrinks activations (γ < 1, see evaluation.py). Losses are the squared error
summed over dimensions and averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmscope.errors import InputError
from lmscope.sae.base import SAE, LossOut, SAEConfig


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    l1: float = 5.0
    decoder: str = "weighted"   # "weighted" | "unit_norm"

    arch: ClassVar[str] = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder not in ("weighted", "unit_norm"):
            raise InputError(f"ReLUConfig.decoder={self.decoder!r}: use 'weighted' or 'unit_norm'.")
        if self.l1 < 0:
            raise InputError(f"ReLUConfig.l1 must be ≥ 0, got {self.l1}.")


class ReLUSAE(SAE):
    coeff_name = "l1"

    def __init__(self, cfg: ReLUConfig):
        self.unit_norm_decoder = cfg.decoder == "unit_norm"
        self.apply_b_dec_to_input = cfg.decoder == "unit_norm"
        super().__init__(cfg)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    def init_decoder_norm(self) -> float:
        return 1.0 if self.cfg.decoder == "unit_norm" else 0.1

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.sae_in(x_BD) @ self.W_enc + self.b_enc

    def encode_n(self, x_BD):
        return torch.relu(self.pre_acts(x_BD))

    def loss(self, x_BD, coeff=None, *, dead_F=None, mse_scale=1.0):
        lam = self.coeff if coeff is None else coeff
        f = self.encode_n(x_BD)
        mse = (self.decode_n(f) - x_BD).pow(2).sum(-1).mean()
        if self.unit_norm_decoder:
            sparsity = f.sum(-1).mean()
        else:
            sparsity = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = mse + lam * sparsity
        return LossOut(loss, {"mse": mse.detach().item(), "l1": sparsity.detach().item()}, f)

    def extra_tensors(self):
        return {"b_enc": self.b_enc}
