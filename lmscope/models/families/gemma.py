"""Gemma 2 and Gemma 3 (text): post-norms, sliding-window layers, soft-capping.

Each block normalises the attention and MLP writes with their own RMSNorm before adding them
(``x + post_norm(attn(pre_norm(x)))``), RMSNorm weights multiply as ``1 + w`` ("rms_offset"), the
embedding is scaled by √D inside its module, and Gemma 2 soft-caps the final logits.
"""

from lmscope.models.families.llama import ATTENTION, GATED_MLP
from lmscope.models.parts import Adapter, Block, ConfigFields, Embedding, Final, Norms

ADAPTER = Adapter(
    family="gemma3", model_types=("gemma3_text", "gemma2"),
    embedding=Embedding("model.embed_tokens"), layers="model.layers",
    block=Block(mixer=ATTENTION, mlp=GATED_MLP,
                norms=Norms(kind="rms_offset", pre_mixer="input_layernorm", pre_mlp="pre_feedforward_layernorm",
                            post_mixer="post_attention_layernorm", post_mlp="post_feedforward_layernorm")),
    final=Final(norm="model.norm", unembed="lm_head"),
    config=ConfigFields(softcap="final_logit_softcapping", attn_softcap="attn_logit_softcapping",
                        sliding_window="sliding_window"),
    source="lmscope/models/families/gemma.py",
)
