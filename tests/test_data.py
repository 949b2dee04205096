"""Corpora and token contexts: deterministic splits, packing, user files and folders, the default corpus."""

from __future__ import annotations

import pytest
import torch

from lmscope.data import Corpus, load_corpus, token_contexts
from lmscope.errors import InputError

from conftest import WORDS


def _sentences(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),),
                                                      generator=g).tolist()) for _ in range(n)]


def test_split_is_deterministic_disjoint_and_order_free():
    docs = _sentences(400)
    c = Corpus("x", tuple(docs))
    train, held = c.split("train"), c.split("heldout")
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(set(docs))
    assert 5 <= len(held) <= 40  # about 5 %
    rev = Corpus("y", tuple(reversed(docs)))  # the split depends on the texts, not their order
    assert rev.split("heldout") == held and rev.split("train") == train
    with pytest.raises(InputError, match="split"):
        c.split("test")


def test_file_and_folder_corpora(tmp_path):
    docs = _sentences(30, seed=1)
    f = tmp_path / "text.txt"
    f.write_text("\n\n".join(docs))
    c = load_corpus(f)
    assert list(c.documents) == [d.strip() for d in docs]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs[:5]):
        (folder / f"{i:02d}.txt").write_text(d)
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    assert load_corpus(folder).documents == tuple(docs[:5])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt"):
        load_corpus(tmp_path / "empty")
    with pytest.raises(InputError, match="not a file or folder|datasets"):
        load_corpus(tmp_path / "missing-name")


def test_token_contexts_pack_documents_in_split_order(tiny_llama, tmp_path):
    docs = _sentences(200, seed=2)
    c = Corpus("x", tuple(docs))
    ctx = token_contexts(tiny_llama, c, context=16, split="train")
    tok = tiny_llama.tokenizer
    # naive reference: concatenate each train document's ids + eos, cut into windows of 16
    stream = []
    for d in c.split("train"):
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 16
    assert torch.equal(ctx, torch.tensor(stream[:n * 16]).reshape(n, 16))
    assert torch.equal(token_contexts(tiny_llama, c, 16, "train", max_tokens=80), ctx[:5])
    held = token_contexts(tiny_llama, c, 4, "heldout")
    assert held.shape[1] == 4 and held.dtype == torch.long
    with pytest.raises(InputError, match="fewer than"):
        token_contexts(tiny_llama, Corpus("s", ("a cat", "the dog")), context=64)
    with pytest.raises(InputError, match="longer than"):
        token_contexts(tiny_llama, c, context=10_000)


@pytest.mark.real
def test_default_corpus_is_english_and_deterministic(smollm):
    c = load_corpus("default")
    assert len(c) > 100_000 and c.meta["source"] == "sae-probes"
    assert not any("#include" in d for d in c.documents[:: 50])
    a = token_contexts(smollm, c, context=64, split="heldout", max_tokens=64 * 3)
    b = token_contexts(smollm, load_corpus("default"), context=64, split="heldout", max_tokens=64 * 3)
    assert a.shape == (3, 64) and torch.equal(a, b)
    train = token_contexts(smollm, c, context=64, split="train", max_tokens=64 * 3)
    assert not torch.equal(a, train)
    text = smollm.decode(a[0].tolist())
    assert sum(w.isalpha() for w in text.split()) > 20  # English words, not code or numbers


def test_hugging_face_datasets_saved_to_disk(tmp_path, tiny_llama):
    """A local `datasets` Dataset / DatasetDict saved with save_to_disk loads as a corpus (nothing downloaded)."""
    datasets = pytest.importorskip("datasets")
    docs = _sentences(60, seed=4)
    rows = {"text": [*docs, "", None], "label": list(range(len(docs) + 2))}  # empty and missing texts are dropped
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    c = load_corpus(tmp_path / "ds")
    assert c.documents == tuple(docs) and c.meta["source"] == "datasets"
    assert c.split("train") == Corpus("ref", tuple(docs)).split("train")
    ctx = token_contexts(tiny_llama, c, context=8, split="train")
    assert ctx.shape[1] == 8 and len(ctx) > 0
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:10]}),
                          "test": datasets.Dataset.from_dict({"text": docs[10:12]})}).save_to_disk(str(tmp_path / "dd"))
    assert load_corpus(tmp_path / "dd").documents == tuple(docs[:10])  # the train split
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "v"))
    with pytest.raises(InputError, match="no 'train' split"):
        load_corpus(tmp_path / "v")
    datasets.Dataset.from_dict({"sentence": docs}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(InputError, match="no 'text' column"):
        load_corpus(tmp_path / "nt")
    with pytest.raises(InputError, match="offline"):  # a name not in the local cache: a clear error, no download
        load_corpus("lmscope-no-such-user/no-such-dataset")
