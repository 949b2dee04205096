"""RWKV (Peng et al. 2023, RWKV-4; transformers' ``RwkvForCausalLM``): blocks ``x + time_mix(ln1(x))`` then
``x + channel_mix(ln2(x))``, LayerNorms throughout; block 0 first applies a LayerNorm (``pre_ln``) to the
embeddings, so the residual stream (``embed``) starts after it; a final LayerNorm and an unembedding.

The time mix (WKV, the mixer) and the channel mix (the MLP part) both mix each token with the previous one
(token shift). The channel mix is ``σ(receptance(x_r)) ⊙ value(relu(key(x_k))²)``: the down projection is
``value``, its input ``relu(key(x_k))²`` is ``mlp.post``, and the sigmoid gate is named so that per-neuron terms
carry it. lmscope runs both through its own path (:mod:`lmscope.models.wkv`): transformers ignores the
attention mask, and the path keeps padding out of the token shift and the WKV sums. At load the model's
``rescale_every`` is set to 0 (see :func:`lmscope.models.wkv.prepare`), so the residual stream is the true one.
"""

from lmscope.models.parts import MLP, Adapter, Block, ConfigFields, Embedding, Final, Norms, TimeMix

ADAPTER = Adapter(
    family="rwkv", model_types=("rwkv",),
    embedding=Embedding("rwkv.embeddings", norm="pre_ln"), layers="rwkv.blocks",
    block=Block(mixer=TimeMix(module="attention", receptance="attention.receptance", key="attention.key",
                              value="attention.value", output="attention.output"),
                mlp=MLP(module="feed_forward", down="feed_forward.value", gate="feed_forward.receptance"),
                norms=Norms(kind="layer", pre_mixer="ln1", pre_mlp="ln2")),
    final=Final(norm="rwkv.ln_out", unembed="head"),
    config=ConfigFields(n_heads=None, n_kv_heads=None, n_ctx=None),
    source="lmscope/models/families/rwkv.py",
)
