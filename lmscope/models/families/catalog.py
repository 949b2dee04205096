"""The supported architecture families, and :func:`adapter_for`, which picks one by ``model_type``."""

from __future__ import annotations

from lmscope.errors import UnsupportedArchitectureError
from lmscope.models.families import attn_only, gemma, gpt2, gpt_neox, llama, mamba, rwkv
from lmscope.models.parts import Adapter

ADAPTERS: tuple[Adapter, ...] = (llama.ADAPTER, gemma.ADAPTER, gpt2.ADAPTER, gpt_neox.ADAPTER, attn_only.ADAPTER,
                                 mamba.ADAPTER, mamba.FALCON_ADAPTER, mamba.MAMBA2_ADAPTER, rwkv.ADAPTER)


def adapter_for(config) -> Adapter:
    """The adapter for a HF config (config-chosen details resolved), or an error naming the families."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter.for_config(config)
    supported = ", ".join(f"{a.family} ({', '.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedArchitectureError(
        f"lmscope has no adapter for model_type {model_type!r}. Supported: {supported}. "
        "To add one, write a family file in lmscope/models/families/ composing its parts (embedding, "
        "block = mixer + optional MLP + norms, final norm and unembedding, config field names; see "
        "lmscope/models/parts.py) and list it in lmscope/models/families/catalog.py."
    )
