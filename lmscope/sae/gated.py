"""Gated SAE (Rajamanoharan et al., NeurIPS 2024): separate "which latents fire" from "how strongly".

With ``x̃ = x − b_dec``: gate ``π_gate = x̃ W_enc + b_gate``, ``f_gate = 1[π_gate > 0]``; magnitude with tied
weights and a per-latent log-rescale ``π_mag = exp(r_mag) ⊙ (x̃ W_enc) + b_mag``, ``f_mag = ReLU(π_mag)``;
``f = f_gate ⊙ f_mag``, ``x̂ = f W_dec + b_dec``.

Loss: ``‖x − x̂‖² + λ ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖²`` where ``x̂_frozen`` uses
stop-gradient copies of W_dec and b_dec, so the auxiliary term trains only the gate (the Heaviside passes no
gradient). The L1 touches only the gate path: magnitudes are not shrunk (γ ≈ 1). Unit-norm decoder rows,
``W_enc = W_decᵀ``, biases and r_mag start at 0. Tensor names follow SAELens (b_gate, r_mag, b_mag; no b_enc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lmscope.errors import InputError
from lmscope.sae.base import SAE, LossOut, SAEConfig


@dataclass(frozen=True)
class GatedConfig(SAEConfig):
    l1: float = 1.0

    arch: ClassVar[str] = "gated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1 < 0:
            raise InputError(f"GatedConfig.l1 must be ≥ 0, got {self.l1}.")


class GatedSAE(SAE):
    coeff_name = "l1"

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        self.b_gate = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    def paths(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and magnitude pre-activations (B, F) each."""
        proj = self.sae_in(x_BD) @ self.W_enc
        return proj + self.b_gate, proj * self.r_mag.exp() + self.b_mag

    def encode_n(self, x_BD):
        pi_gate, pi_mag = self.paths(x_BD)
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def loss(self, x_BD, coeff=None, *, dead_F=None, mse_scale=1.0):
        lam = self.coeff if coeff is None else coeff
        pi_gate, pi_mag = self.paths(x_BD)
        f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
        mse = (self.decode_n(f) - x_BD).pow(2).sum(-1).mean()
        gate_act = torch.relu(pi_gate)
        sparsity = gate_act.sum(-1).mean()
        x_frozen = gate_act @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x_frozen - x_BD).pow(2).sum(-1).mean()
        loss = mse + lam * sparsity + aux
        return LossOut(loss, {"mse": mse.detach().item(), "l1": sparsity.detach().item(), "aux": aux.detach().item()}, f)

    def extra_tensors(self):
        return {"b_gate": self.b_gate, "r_mag": self.r_mag, "b_mag": self.b_mag}
