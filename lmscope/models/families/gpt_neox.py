"""GPT-NeoX (Pythia): LayerNorm blocks, a fused projection laid out [q|k|v] per head, partial
RoPE, and (by default) attention and MLP in parallel: ``x + attn(ln1(x)) + mlp(ln2(x))``."""

from lmscope.models.parts import MLP, Adapter, Attention, Block, ConfigFields, Embedding, Final, Norms

ADAPTER = Adapter(
    family="gpt-neox", model_types=("gpt_neox",),
    embedding=Embedding("gpt_neox.embed_in"), layers="gpt_neox.layers",
    block=Block(mixer=Attention(module="attention", o_proj="attention.dense", qkv="attention.query_key_value",
                                qkv_layout="per_head"),
                mlp=MLP(module="mlp", down="mlp.dense_4h_to_h"),
                norms=Norms(kind="layer", pre_mixer="input_layernorm", pre_mlp="post_attention_layernorm")),
    final=Final(norm="gpt_neox.final_layer_norm", unembed="lm_head"),
    config=ConfigFields(n_kv_heads=None, parallel="use_parallel_residual"),
    source="lmscope/models/families/gpt_neox.py",
)
