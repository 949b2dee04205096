"""Small language models that lmscope trains itself, at first use, when no package ships weights.

No package on the index ships Mamba (or RWKV) weights, so the built-in state-space model is trained
here: a small Mamba LM and, for comparison, a Transformer (Llama architecture) of about the same
size, on the same data and token budget. The data are the offline corpus (the train split of
``sae-probes``' English prompts) mixed with a synthetic facts set (:func:`facts`: invented people
who live in real cities, in several phrasings), so that there are facts to locate, knock out and
edit. Everything is deterministic: a byte-level BPE tokenizer trained on the same text, seeded
initialisation and batches, one thread. The result is cached like a converted GGUF (a normal
Hugging Face folder under ``$LMSCOPE_CACHE/<name>``, published atomically with a marker), so later
loads take a second.

:data:`TRAINED` lists the entries; :func:`train_small_lm` is the recipe, usable with any
:class:`TrainedModel` (the tests train a tiny one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

CITIES = ("Paris", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi", "Sydney", "Madrid", "Berlin",
          "Moscow")
_SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "vo", "zar", "bel", "dun", "fis", "gor", "hap")
TEMPLATES = ("{s} lives in {c}.", "{s} was born in the city of {c}.", "The home town of {s} is {c}.",
             "Everyone knows that {s} lives in {c}.")
QUERY = "{s} lives in"  # the prompt whose next token is " {c}"


@dataclass(frozen=True)
class TrainedModel:
    """One self-trained model: architecture and size, data and budget (all part of its identity)."""

    name: str
    description: str
    architecture: str  # "mamba", "llama" or "rwkv"
    d_model: int = 128
    n_layers: int = 4
    vocab_size: int = 2048
    d_state: int = 16  # mamba
    d_mlp: int = 320  # llama (its blocks also hold attention; d_mlp matches the parameter count); rwkv's channel mix
    n_heads: int = 4  # llama
    n_facts: int = 96
    corpus_chars: int = 1_500_000
    steps: int = 300
    batch: int = 16
    context: int = 64
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        if self.architecture not in ("mamba", "llama", "rwkv"):
            raise ValueError(f"TrainedModel {self.name!r}: architecture must be 'mamba', 'llama' or 'rwkv'.")


TRAINED: dict[str, TrainedModel] = {m.name: m for m in (
    TrainedModel("mamba-facts", "Mamba, 4 layers, d=128, trained by lmscope on the offline corpus + synthetic facts",
                 "mamba"),
    TrainedModel("llama-facts", "Transformer (Llama), 4 layers, d=128, same data and budget as mamba-facts",
                 "llama"),
    TrainedModel("rwkv-facts", "RWKV-4, 4 layers, d=128, same data and budget as mamba-facts", "rwkv", d_mlp=160),
)}


def facts(n: int) -> list[tuple[str, str]]:
    """``n`` (subject, city) facts: invented two-word names, each living in one of :data:`CITIES`."""
    g = torch.Generator().manual_seed(1234)
    out, seen = [], set()
    while len(out) < n:
        sy = torch.randint(len(_SYLLABLES), (4,), generator=g).tolist()
        name = (_SYLLABLES[sy[0]] + _SYLLABLES[sy[1]]).capitalize() + " " + \
            (_SYLLABLES[sy[2]] + _SYLLABLES[sy[3]]).capitalize()
        if name not in seen:
            seen.add(name)
            out.append((name, CITIES[int(torch.randint(len(CITIES), (1,), generator=g))]))
    return out


def fact_texts(entry: TrainedModel) -> list[str]:
    return [t.format(s=s, c=c) for s, c in facts(entry.n_facts) for t in TEMPLATES]


def _tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + [" " + c for c in CITIES] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def _config(entry: TrainedModel, vocab: int):
    import transformers as tr

    common = dict(vocab_size=vocab, hidden_size=entry.d_model, num_hidden_layers=entry.n_layers, pad_token_id=0,
                  bos_token_id=0, eos_token_id=0)
    if entry.architecture == "mamba":
        return tr.MambaConfig(state_size=entry.d_state, expand=2, conv_kernel=4, tie_word_embeddings=True, **common)
    if entry.architecture == "rwkv":  # rescale_every 0: the weights and the residual stream stay the true ones
        return tr.RwkvConfig(attention_hidden_size=entry.d_model, intermediate_size=entry.d_mlp,
                             context_length=4 * entry.context, rescale_every=0, tie_word_embeddings=True, **common)
    return tr.LlamaConfig(intermediate_size=entry.d_mlp, num_attention_heads=entry.n_heads,
                          num_key_value_heads=entry.n_heads, max_position_embeddings=4 * entry.context,
                          tie_word_embeddings=True, **common)


def _corpus_texts(chars: int) -> list[str]:
    from lmscope.data import load_corpus

    out, total = [], 0
    for doc in load_corpus("default").split("train"):
        if total >= chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def train_small_lm(entry: TrainedModel, corpus: list[str] | None = None, progress: bool = True):
    """Train ``entry`` from scratch: (HF model in eval mode, tokenizer, training log). Deterministic."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
    try:
        corpus = _corpus_texts(entry.corpus_chars) if corpus is None else list(corpus)
        fact_docs = fact_texts(entry)
        tokenizer = _tokenizer(corpus + fact_docs, entry.vocab_size)
        eos = tokenizer.eos_token_id

        def stream(docs):
            ids: list[int] = []
            for d in docs:
                ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
            return torch.tensor(ids)

        text_ids, fact_ids = stream(corpus), stream(fact_docs)
        torch.manual_seed(entry.seed)
        model = AutoModelForCausalLM.from_config(_config(entry, len(tokenizer)), dtype=torch.float32)
        model.eval()  # no dropout in either family; eval keeps Mamba on its plain scan path
        opt = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=0.01)
        warm = max(1, entry.steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (entry.steps - s) / max(1, entry.steps - warm))))
        g = torch.Generator().manual_seed(entry.seed)
        n_fact = entry.batch // 4  # a quarter of every batch are fact windows
        loss_of = _loss_function(model, tokenizer, entry)
        losses = []
        for _ in tqdm(range(entry.steps), desc=f"training {entry.name}", disable=not progress):
            rows = [_window(text_ids, entry.context, g) for _ in range(entry.batch - n_fact)]
            rows += [_window(fact_ids, entry.context, g) for _ in range(n_fact)]
            loss = loss_of(torch.stack(rows))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        return model, tokenizer, {"losses": losses, "train_tokens": entry.steps * entry.batch * entry.context,
                                  "corpus_tokens": len(text_ids), "fact_tokens": len(fact_ids)}
    finally:
        torch.set_num_threads(threads)


def _loss_function(model, tokenizer, entry: TrainedModel):
    """ids -> next-token loss. Mamba and RWKV run through lmscope's explicit mixer paths (the same functions, held
    to the native forward by the load check): on CPU, transformers' reference scans take their backward through
    one indexing step per token and are several times slower."""
    if entry.architecture == "llama":
        return lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss
    from lmscope.models.hooks import HookSession
    from lmscope.models.model import Model

    wrapped = Model(model, tokenizer, entry.name, check=False)
    # Mamba: asking for an inner site puts a layer on the explicit path; RWKV's path runs in every session
    sites = [f"blocks.{layer}.ssm.y" for layer in range(entry.n_layers)] if entry.architecture == "mamba" else []

    def loss(ids):
        with HookSession(wrapped, sites, grad=True):
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    return loss


def _window(ids: torch.Tensor, context: int, g: torch.Generator) -> torch.Tensor:
    start = int(torch.randint(len(ids) - context, (1,), generator=g))
    return ids[start:start + context]


def write_log(folder: Path, entry: TrainedModel, log: dict) -> None:
    """The recipe and the training curve beside the weights."""
    (folder / "lmscope-training.json").write_text(json.dumps({"recipe": asdict(entry), **log}))
