"""An attention-only transformer: lmscope's own small Hugging Face causal LM, and its adapter.

transformers has no attention-only causal LM, so lmscope ships one (``model_type``
``"lmscope_attn_only"``, registered with ``AutoConfig`` and ``AutoModelForCausalLM``, so
``save_pretrained``/``from_pretrained`` and :func:`lmscope.load` on its folder work). Each block is
``x + attn(norm(x))``: token embedding, RoPE, causal multi-head attention through transformers'
attention interface (so lmscope's attention function, pattern capture and prefix reuse work), no
MLP, a final norm and an unembedding. The norm is LayerNorm (``norm="layer"``) or RMSNorm
(``norm="rms"``). With ``feature_dim`` F > 0 some tokens stand for fixed F-dimensional feature
vectors mapped in by a learned linear layer (:class:`FeatureEmbedding`; the few-shot classification
testbed of :mod:`lmscope.training`). It is the testbed of the attention-only circuits literature (Elhage et al.,
2021, "A Mathematical Framework for Transformer Circuits") and of training-time clamping.

Shapes: B prompts, T tokens, H heads of width dh = D / H, D residual width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lmscope.models.attention import _explicit
from lmscope.models.parts import Adapter, Attention, Block, ConfigFields, Embedding, Final, Norms

MODEL_TYPE = "lmscope_attn_only"


class AttnOnlyConfig(PretrainedConfig):
    """Size of an attention-only transformer: ``n_layers`` blocks of ``n_heads`` heads over width ``d_model``."""

    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 128, hidden_size: int = 64, num_hidden_layers: int = 2,
                 num_attention_heads: int = 8, max_position_embeddings: int = 512, norm: str = "layer",
                 norm_eps: float = 1e-5, rope_theta: float = 10000.0, attention_bias: bool = False,
                 initializer_range: float = 0.02, tie_word_embeddings: bool = False, feature_dim: int = 0,
                 **kwargs):
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm={norm!r}: use 'layer' (LayerNorm) or 'rms' (RMSNorm).")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_attention_heads}.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.norm = norm
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.initializer_range = initializer_range
        self.feature_dim = feature_dim
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class FeatureEmbedding(nn.Module):
    """Token embeddings where some tokens stand for fixed feature vectors (``feature_dim`` F > 0).

    A feature token's embedding is ``proj(features[id])`` (a learned linear map of a stored (F,) vector,
    e.g. an image's feature vector in few-shot classification); any other token (a label) has a learned
    row of ``table``. ``weight`` is the (V, D) matrix of all embeddings, so the model's ``W_E`` is well defined.
    """

    def __init__(self, vocab_size: int, hidden_size: int, feature_dim: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, hidden_size)
        self.proj = nn.Linear(feature_dim, hidden_size, bias=False)
        self.register_buffer("features", torch.zeros(vocab_size, feature_dim))
        self.register_buffer("is_feature", torch.zeros(vocab_size, dtype=torch.bool))

    @property
    def weight(self) -> torch.Tensor:
        feat = self.proj(self.features)
        return torch.where(self.is_feature[:, None], feat, self.table.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


def _norm(config: AttnOnlyConfig) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Explicit attention: (B, T, H, dh) output and (B, H, T, S) probabilities."""
    return _explicit(query, key, value, attention_mask, scaling, None)


class AttnOnlyAttention(nn.Module):
    """Causal multi-head self-attention with RoPE; the attention itself is transformers' interface."""

    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, dh)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings  # (B, T, dh)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager)
        out, weights = attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


class AttnOnlyBlock(nn.Module):
    def __init__(self, config: AttnOnlyConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = AttnOnlyAttention(config, layer_idx)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_embeddings=None, cache=None,
                attentions: list | None = None) -> torch.Tensor:
        """``attentions``: a list that receives this block's attention probabilities (when asked for)."""
        write, weights = self.self_attn(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                        position_embeddings=position_embeddings, cache=cache)
        if attentions is not None:
            attentions.append(weights)
        return hidden_states + write


class KVCache:
    """Keys and values of earlier positions, per layer (for :meth:`lmscope.models.Model.generate`)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def get_seq_length(self) -> int:
        return 0 if not self.keys else next(iter(self.keys.values())).shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass
class AttnOnlyOutput(ModelOutput):
    logits: torch.Tensor | None = None
    cache: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # each block's input, then the final norm's output
    attentions: tuple[torch.Tensor | None, ...] | None = None  # probabilities (eager attention only)


class AttnOnlyPreTrainedModel(PreTrainedModel):
    config_class = AttnOnlyConfig
    base_model_prefix = "model"
    _supports_attention_backend = True
    _supports_sdpa = True
    _no_split_modules = ["AttnOnlyBlock"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class AttnOnlyModel(AttnOnlyPreTrainedModel):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        if getattr(config, "feature_dim", 0):
            self.embed_tokens = FeatureEmbedding(config.vocab_size, config.hidden_size, config.feature_dim)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([AttnOnlyBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config)
        self.post_init()

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, T, dh), for (B, T) positions (computed here, not stored: nothing to load)."""
        dh = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = self.config.rope_theta ** (-torch.arange(0, dh, 2, dtype=torch.float32, device=position_ids.device)
                                              / dh)
        angles = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> AttnOnlyOutput:
        """The final norm's output as ``logits`` (the causal LM head unembeds it)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Give exactly one of input_ids and inputs_embeds.")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and cache is None:
            cache = KVCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        mask = causal_mask(attention_mask, t)
        pe = self.rope(position_ids, x.dtype)
        hidden, weights = [], [] if output_attentions else None
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, attention_mask=mask, position_embeddings=pe, cache=cache, attentions=weights)
        x = self.norm(x)
        return AttnOnlyOutput(logits=x, cache=cache, hidden_states=(*hidden, x) if output_hidden_states else None,
                              attentions=tuple(weights) if output_attentions else None)


def causal_mask(attention_mask: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, t, S) boolean mask, True where a query (the last t of S positions) may attend a key.

    A query always sees itself, so the rows of padding tokens are never empty (no NaNs from SDPA).
    """
    s = attention_mask.shape[1]
    q_pos = torch.arange(s - t, s, device=attention_mask.device)
    k_pos = torch.arange(s, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (t, S)
    visible = attention_mask.bool()[:, None, None, :] | (k_pos[None, :] == q_pos[:, None])[None, None]
    return causal[None, None] & visible


class AttnOnlyForCausalLM(AttnOnlyPreTrainedModel):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.model = AttnOnlyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int = 0, output_hidden_states: bool = False, output_attentions: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> AttnOnlyOutput:
        out = self.model(input_ids, attention_mask, position_ids, cache, use_cache, output_hidden_states,
                         output_attentions, inputs_embeds)
        x = out.logits[:, -logits_to_keep:] if logits_to_keep else out.logits
        out.logits = self.lm_head(x)
        return out


AutoConfig.register(MODEL_TYPE, AttnOnlyConfig, exist_ok=True)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM, exist_ok=True)

ADAPTER = Adapter(
    family="attn-only", model_types=(MODEL_TYPE,),
    embedding=Embedding("model.embed_tokens"), layers="model.layers",
    block=Block(mixer=Attention(module="self_attn", o_proj="self_attn.o_proj", q_proj="self_attn.q_proj",
                                k_proj="self_attn.k_proj", v_proj="self_attn.v_proj"),
                norms=Norms(kind="layer", pre_mixer="input_layernorm")),
    final=Final(norm="model.norm", unembed="lm_head"),
    config=ConfigFields(n_kv_heads=None, norm_kind="norm"),
    source="lmscope/models/families/attn_only.py",
)
