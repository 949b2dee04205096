"""The model access layer: the only code in lmscope that knows model internals."""

from lmscope.models.decompose import Decomposition, decompose, decompose_cache, readout_values
from lmscope.models.edges import EdgeGraph, edge_forward, edge_graph, upstream_values
from lmscope.models.loading import list_models
from lmscope.models.memo import RunMemo
from lmscope.models.memory import MEMORY_KINDS, EditHandle, Memory
from lmscope.models.mixing import block_outputs, embed_parts
from lmscope.models.model import Batch, Model, ModelSpec, RunOutput, StepInterventions
from lmscope.models.randomize import randomized_copy
from lmscope.models.readout import LogitDirection
from lmscope.models.testbed import named_parameters, new_attn_only, parameters, save_model, word_tokenizer
from lmscope.sites import Site, parse_site

__all__ = ["Batch", "Decomposition", "EdgeGraph", "EditHandle", "LogitDirection", "MEMORY_KINDS", "Memory", "Model",
           "ModelSpec", "RunOutput", "Site",
           "StepInterventions", "block_outputs", "decompose", "decompose_cache", "edge_forward", "edge_graph",
           "embed_parts", "list_models", "load", "named_parameters", "new_attn_only", "parameters", "parse_site",
           "randomized_copy", "readout_values", "RunMemo", "save_model", "upstream_values", "word_tokenizer"]


def load(spec: str | None = None, *, dtype="float32", device=None, device_map=None, check: bool = True,
         progress: bool = True) -> Model:
    """Load a model: a built-in name (default ``smollm2-135m``), a local HF folder, a ``.gguf`` file,
    or a hub id (only where a hub or a filled HF cache is reachable). The model is checked at load."""
    from lmscope.models.loading import load_hf
    from lmscope.models.registry import DEFAULT_MODEL

    hf, tokenizer, name = load_hf(spec or DEFAULT_MODEL, dtype=dtype, device=device, device_map=device_map,
                                  progress=progress)
    return Model(hf, tokenizer, name, check=check)
