"""Shared fixtures: tiny random models of every supported family (no weights needed), and the real
default model (prepared once into the lmscope cache)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a cat dog sat on mat and when Mary John went to store gave drink ran fast slow red blue "
         "green big small house tree river sun moon star one two three four five six seven eight nine "
         "ten is was he she it they we you I of in at by for with from up down left right yes no").split()


AB_TOKENS = ("(", "A", "B")  # the answer letters of A/B questions (CAA), not drawn into generated texts


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2}
    for w in (*WORDS, *AB_TOKENS):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<pad>")


VOCAB = 80


def tiny_config(family: str):
    import transformers as tr

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                  eos_token_id=1, tie_word_embeddings=False)
    if family == "llama":
        return tr.LlamaConfig(num_key_value_heads=2, **common)
    if family == "mistral":
        return tr.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return tr.Qwen2Config(num_key_value_heads=2, **common)
    if family == "gemma3":
        return tr.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=8, **common)
    if family == "gemma2":  # soft-capped attention scores and logits, alternating sliding windows
        return tr.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                               final_logit_softcapping=3.0, **common)
    if family == "gpt2":
        return tr.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                             bos_token_id=2, eos_token_id=1, pad_token_id=1)
    if family in ("neox", "neox-seq"):
        return tr.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=128, rotary_pct=0.5,
                                use_parallel_residual=family == "neox", pad_token_id=1, bos_token_id=2,
                                eos_token_id=1, tie_word_embeddings=False)
    if family in ("attn_only", "attn_only-rms"):  # lmscope's own attention-only model (no MLP)
        from lmscope.models.families.attn_only import AttnOnlyConfig

        return AttnOnlyConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=128, norm="rms" if family.endswith("rms") else "layer",
                              attention_bias=family == "attn_only", pad_token_id=1, bos_token_id=2, eos_token_id=1)
    if family == "mamba":  # a state-space model: no attention, no MLP
        return tr.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2,
                              conv_kernel=4, pad_token_id=1, bos_token_id=2, eos_token_id=1)
    if family == "falcon_mamba":  # Mamba with RMS-normalised Δ, B and C
        return tr.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2,
                                    conv_kernel=4, pad_token_id=1, bos_token_id=2, eos_token_id=1)
    if family == "mamba2":  # SSD: 8 heads of 8 channels in 2 groups
        return tr.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, state_size=4, expand=2,
                               num_heads=8, head_dim=8, n_groups=2, conv_kernel=4, chunk_size=8, pad_token_id=1,
                               bos_token_id=2, eos_token_id=1)
    if family == "rwkv":  # time mix (WKV) + gated channel mix; 48 channel-mix neurons (E = D, as the cache needs)
        return tr.RwkvConfig(vocab_size=VOCAB, hidden_size=32, attention_hidden_size=32, intermediate_size=48,
                             num_hidden_layers=3, context_length=128, rescale_every=2, pad_token_id=1,
                             bos_token_id=2, eos_token_id=1)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "neox", "neox-seq"]


def make_tiny(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from lmscope.models import Model

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so that effects are not tiny
        for name, p in hf.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3 if "emb" in name or "wte" in name or "wpe" in name else 0.15)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return Model(hf, tiny_tokenizer(), f"tiny-{family}")


def unembedding_output(model, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, logits)``, each (T, V), for ``prompt`` from a plain forward of the HF model: z is the output of
    its unembedding module (read with a plain torch hook, not lmscope's), logits what the model returns."""
    captured = []
    handle = model.hf.get_output_embeddings().register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        with torch.no_grad():
            logits = model.forward(model.encode(prompt)).logits
    finally:
        handle.remove()
    (z,) = captured
    return z[0].float(), logits[0].float()


def logit_references(model, prompt: str, target: str, foil: str | None = None, position: int = -1):
    """``(metric, decomposed, output)`` for the logit (difference) of ``target`` (− ``foil``) at ``position``:
    what a linear decomposition of the logits can sum to (the unembedding's output, before any soft-cap),
    its name, and the model's output value. Without a soft-cap the two values are the same number."""
    z, logits = unembedding_output(model, prompt)
    z, logits = z[position], logits[position]
    t, f = model.token_id(target), None if foil is None else model.token_id(foil)

    def value(x):
        return float(x[t] - (x[f] if f is not None else 0.0))

    metric = "logit" if foil is None else "logit difference"
    cap = getattr(model.hf.config, "final_logit_softcapping", None)
    if cap is None:
        torch.testing.assert_close(z, logits, atol=0, rtol=0)
        return metric, value(logits), value(logits)
    torch.testing.assert_close(torch.tanh(z / cap) * cap, logits)
    return f"pre-soft-cap {metric}", value(z), value(logits)


@pytest.fixture(params=FAMILIES, scope="session")
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny("llama")


@pytest.fixture(scope="session")
def smollm():
    import lmscope

    return lmscope.load("smollm2-135m", progress=False)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for torchrun rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
