"""Small models built and trained in process: create an attention-only model from scratch, reach its
parameters for an optimiser, and save it so that :func:`lmscope.load` opens it like any other model.

Training workflows (:mod:`lmscope.training`) live outside ``models/``; these are the only functions
they need that touch the native module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lmscope.models.model import Model


def word_tokenizer(words: Sequence[str]):
    """A whitespace word-level tokenizer whose ids are the positions of ``words`` (then ``<unk>``, ``<pad>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    vocab.setdefault("<unk>", len(vocab))
    vocab.setdefault("<pad>", len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def new_attn_only(words: Sequence[str], *, d_model: int = 64, n_layers: int = 2, n_heads: int = 8,
                  norm: str = "layer", features: torch.Tensor | None = None, n_ctx: int = 64, seed: int = 0,
                  name: str = "attn-only-testbed") -> Model:
    """A freshly initialised attention-only model (RoPE, pre-norm, causal) over the vocabulary ``words``.

    ``features`` (V, F), optional: rows that are not all zero make their token a feature token whose
    embedding is a learned linear map of that row (:class:`~lmscope.models.families.attn_only.FeatureEmbedding`).
    """
    from lmscope.models.families.attn_only import AttnOnlyConfig, AttnOnlyForCausalLM

    tokenizer = word_tokenizer(words)
    vocab = len(tokenizer)
    feature_dim = 0 if features is None else int(features.shape[1])
    config = AttnOnlyConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, max_position_embeddings=n_ctx, norm=norm,
                            feature_dim=feature_dim, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    hf = AttnOnlyForCausalLM(config)
    if features is not None:
        emb = hf.get_input_embeddings()
        with torch.no_grad():
            emb.features[: features.shape[0]] = features.float()
            emb.is_feature[: features.shape[0]] = features.abs().sum(-1) > 0
    return Model(hf, tokenizer, name)


def parameters(model: Model) -> Iterator[nn.Parameter]:
    """The model's trainable parameters (for an optimiser)."""
    return (p for p in model.hf.parameters() if p.requires_grad)


def named_parameters(model: Model) -> dict[str, nn.Parameter]:
    return dict(model.hf.named_parameters())


def save_model(model: Model, folder: str | Path) -> Path:
    """Write the model and its tokenizer to ``folder`` (``lmscope.load(folder)`` reads it back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder
