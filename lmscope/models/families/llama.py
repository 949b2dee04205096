"""Llama-like family: Llama, Mistral, Qwen2, SmolLM3 (and SmolLM2, which is a Llama).

Pre-RMSNorm blocks: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; separate q/k/v projections
with grouped-query attention; RoPE.
"""

from lmscope.models.parts import MLP, Adapter, Attention, Block, Embedding, Final, Norms

ATTENTION = Attention(module="self_attn", o_proj="self_attn.o_proj", q_proj="self_attn.q_proj",
                      k_proj="self_attn.k_proj", v_proj="self_attn.v_proj")
GATED_MLP = MLP(module="mlp", down="mlp.down_proj")

ADAPTER = Adapter(
    family="llama", model_types=("llama", "mistral", "qwen2", "smollm3"),
    embedding=Embedding("model.embed_tokens"), layers="model.layers",
    block=Block(mixer=ATTENTION, mlp=GATED_MLP,
                norms=Norms(kind="rms", pre_mixer="input_layernorm", pre_mlp="post_attention_layernorm")),
    final=Final(norm="model.norm", unembed="lm_head"),
    source="lmscope/models/families/llama.py",
)
