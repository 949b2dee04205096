"""Mamba (Gu and Dao, 2023; transformers' ``MambaForCausalLM``): blocks ``x + mixer(rmsnorm(x))``
with a selective state-space mixer and no MLP; a final RMSNorm and an unembedding (tied by default).

The mixer: ``[x_a | g] = in_proj(x)``; ``u = SiLU(conv(x_a))`` (depthwise causal convolution of
width 4); ``Δ, B, C`` from ``x_proj(u)`` (``Δ = softplus(dt_proj(·))``); the scan
``h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t``, ``s_t = C_t · h_t + D ⊙ u_t``; the write
``o = out_proj(s ⊙ SiLU(g))``. The inner sites (``ssm.*``) come from lmscope's explicit mixer path
(:mod:`lmscope.models.ssm`), which the load check holds to the native forward.

Falcon-Mamba (``FalconMambaForCausalLM``, Zuo et al. 2024) is the same block with one difference: the
mixer normalises Δ_rank, B and C (weightless RMS norms, the mixer's ``dt_layernorm``, ``b_layernorm``
and ``c_layernorm``) between ``x_proj`` and the scan; its adapter names them, and the explicit path
calls them.
"""

import dataclasses

from lmscope.models.parts import Adapter, Block, ConfigFields, Embedding, Final, Norms, StateSpace, StateSpace2

MIXER = StateSpace(module="mixer", in_proj="mixer.in_proj", conv="mixer.conv1d", x_proj="mixer.x_proj",
                   dt_proj="mixer.dt_proj", out_proj="mixer.out_proj")

ADAPTER = Adapter(
    family="mamba", model_types=("mamba",),
    embedding=Embedding("backbone.embeddings"), layers="backbone.layers",
    block=Block(mixer=MIXER, norms=Norms(kind="rms", pre_mixer="norm")),
    final=Final(norm="backbone.norm_f", unembed="lm_head"),
    config=ConfigFields(n_heads=None, n_kv_heads=None, n_ctx=None),
    source="lmscope/models/families/mamba.py",
)

FALCON_ADAPTER = dataclasses.replace(
    ADAPTER, family="falcon_mamba", model_types=("falcon_mamba",),
    block=Block(mixer=dataclasses.replace(MIXER, selective_norms=("dt_layernorm", "b_layernorm", "c_layernorm")),
                norms=Norms(kind="rms", pre_mixer="norm")),
)

# Mamba-2 (Dao and Gu 2024; ``Mamba2ForCausalLM``): the same block around the SSD mixer (see lmscope.models.ssm2)
MAMBA2_ADAPTER = dataclasses.replace(
    ADAPTER, family="mamba2", model_types=("mamba2",),
    block=Block(mixer=StateSpace2(module="mixer", in_proj="mixer.in_proj", conv="mixer.conv1d", norm="mixer.norm",
                                  out_proj="mixer.out_proj"),
                norms=Norms(kind="rms", pre_mixer="norm")),
)
