"""GPT-2: pre-LayerNorm blocks, absolute position embeddings, one fused [q|k|v] projection stored
as a Conv1D (weight in x out)."""

from lmscope.models.parts import MLP, Adapter, Attention, Block, ConfigFields, Embedding, Final, Norms

ADAPTER = Adapter(
    family="gpt2", model_types=("gpt2",),
    embedding=Embedding("transformer.wte", positions="transformer.wpe"), layers="transformer.h",
    block=Block(mixer=Attention(module="attn", o_proj="attn.c_proj", qkv="attn.c_attn", qkv_layout="blocks"),
                mlp=MLP(module="mlp", down="mlp.c_proj"),
                norms=Norms(kind="layer", pre_mixer="ln_1", pre_mlp="ln_2")),
    final=Final(norm="transformer.ln_f", unembed="lm_head"),
    config=ConfigFields(d_model="n_embd", n_heads="n_head", n_kv_heads=None, n_ctx="n_positions"),
    linear="conv1d",
    source="lmscope/models/families/gpt2.py",
)
