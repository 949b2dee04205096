"""TopK SAE (Gao et al., OpenAI 2024): keep the k largest pre-activations, zero the rest.

``z = ReLU(TopK_k((x − b_dec) W_enc + b_enc))``, ``x̂ = z W_dec + b_dec``. Sparsity is set directly by k, so
there is no penalty coefficient and no shrinkage from an L1 term.

Loss: normalised MSE ``mse_scale · mean_b ‖x − x̂‖²`` with ``mse_scale = 1 / E‖x − E x‖²`` from a data
sample (so it estimates the fraction of variance unexplained), plus AuxK against dead latents:
with the detached residual ``e = x − x̂``, take the ``k_aux`` largest pre-activations among dead latents,
decode them without bias to ``ê`` and add ``α · mean_b ‖ê_b − e_b‖² / ‖e_b‖²`` (α = 1/32; per-example
normalisation as in OpenAI's ``normalized_mean_squared_error``, which also keeps the loss a plain batch mean).
Decoding touches only the k active rows of W_dec (an embedding-bag sum), the main speed lever on CPU.
Unit-norm decoder rows with gradient projection; ``W_enc = W_decᵀ``; b_dec at the geometric median.

Defaults against the paper: k_aux = 256 and α = 1/32 are the reference code's (its heuristic is a power of
two near d_model / 2). A latent counts as dead after ``TrainConfig.dead_tokens`` tokens without firing:
1M here against the paper's 10M, because the runs this library makes on a CPU see a few million tokens
in all; a 10M window would never mark a latent dead in them and AuxK would never act. Set
``dead_tokens=10_000_000`` for the paper's window on long runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmscope.errors import InputError
from lmscope.sae.base import SAE, LossOut, SAEConfig


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int = 256
    aux_coeff: float = 1 / 32

    arch: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise InputError(f"TopK k={self.k} must be between 1 and the number of latents ({self.d_sae}).")
        if self.k_aux < 0:
            raise InputError(f"TopK k_aux must be ≥ 0, got {self.k_aux}.")


class TopKSAE(SAE):
    coeff_name = ""

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.sae_in(x_BD) @ self.W_enc + self.b_enc

    def topk(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-activations (B, F), and the active values and indices (B, k) each."""
        pre = self.pre_acts(x_BD)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return pre, torch.relu(vals), idx

    def decode_sparse(self, vals_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum") + self.b_dec

    def encode_n(self, x_BD):
        _, vals, idx = self.topk(x_BD.reshape(-1, x_BD.shape[-1]))
        f = torch.zeros(vals.shape[0], self.cfg.d_sae, dtype=vals.dtype, device=vals.device).scatter_(-1, idx, vals)
        return f.reshape(*x_BD.shape[:-1], self.cfg.d_sae)

    def loss(self, x_BD, coeff=None, *, dead_F=None, mse_scale=1.0):
        pre, vals, idx = self.topk(x_BD)
        x_hat = self.decode_sparse(vals, idx)
        mse = (x_hat - x_BD).pow(2).sum(-1).mean()
        loss = mse_scale * mse
        parts = {"mse": mse.detach().item()}
        n_dead = 0 if dead_F is None else int(dead_F.sum())
        if n_dead and self.cfg.k_aux and self.cfg.aux_coeff:
            e = (x_BD - x_hat).detach()
            k_aux = min(self.cfg.k_aux, n_dead)
            masked = pre.masked_fill(~dead_F, float("-inf"))
            a_vals, a_idx = masked.topk(k_aux, dim=-1, sorted=False)
            e_hat = F.embedding_bag(a_idx, self.W_dec, per_sample_weights=torch.relu(a_vals), mode="sum")
            aux = ((e_hat - e).pow(2).sum(-1) / e.pow(2).sum(-1).clamp_min(1e-12)).mean()
            loss = loss + self.cfg.aux_coeff * aux
            parts["auxk"] = aux.detach().item()
        with torch.no_grad():
            f = torch.zeros_like(pre).scatter_(-1, idx, vals)
        return LossOut(loss, parts, f)

    def extra_tensors(self):
        return {"b_enc": self.b_enc}
