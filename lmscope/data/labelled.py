"""Labelled probing datasets: (text, label) pairs from a user file or a named built-in set.

A probe (``lmscope.decoding.probes``) or a direction (``lmscope.decoding.steering``) needs texts with
one class label each. They come from

* a user file: ``.csv`` / ``.tsv`` (a header row naming a text column and a label column) or
  ``.jsonl`` (one object per line); the columns are found by name (``text``/``prompt``/``sentence``
  and ``label``/``target``/``y``) or given explicitly;
* a built-in set from the labelled CSVs of the PyPI package ``sae-probes``, which is only used as a
  data folder (never imported; its ``__init__`` imports heavy dependencies). ``make setup`` installs
  it as a data package (:mod:`lmscope.paths`). Names: ``sst2`` (GLUE SST-2 sentiment), ``cola``
  (GLUE CoLA acceptability), ``spam`` (SMS spam), or ``sae-probes:<file stem>`` for any of its sets.

Texts read from files are stripped of surrounding whitespace (every sae-probes text ends in a space,
which would otherwise be the "last token" of every example). A text may mark the token to read with ``[[...]]`` (see ``position="marked"`` in the probes).
Labels keep their string form; ``classes`` lists them sorted and ``y`` gives class indices.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmscope.errors import InputError
from lmscope.paths import data_install_command, find_package_dir

BUILTIN = {"sst2": "92_glue_sst2", "cola": "87_glue_cola", "spam": "96_spam_is"}
_TEXT_FIELDS = ("text", "prompt", "sentence", "input")
_LABEL_FIELDS = ("label", "target", "y", "class")
SAE_PROBES_INSTALL = data_install_command("sae-probes")


@dataclass(frozen=True)
class LabelledSet:
    """Texts with one label each. ``classes`` are the sorted distinct labels; ``y`` (N,) their indices."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    name: str = "labelled"

    def __post_init__(self):
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "labels", tuple(str(lab) for lab in self.labels))
        if len(self.texts) != len(self.labels):
            raise InputError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels; give one "
                             "label per text.")
        for i, (t, lab) in enumerate(zip(self.texts, self.labels)):
            if not isinstance(t, str) or not t.strip():
                raise InputError(f"{self.name}: example {i} has an empty text; remove it or fill it in.")
            if lab.strip() == "" or lab.lower() in ("nan", "none", "null"):
                raise InputError(f"{self.name}: example {i} ({t[:40]!r}) has no label; every text needs one.")
        if len(set(self.labels)) < 2:
            only = self.labels[0] if self.labels else "none"
            raise InputError(f"{self.name}: all {len(self.labels)} examples have the same label ({only!r}); a probe "
                             "or a direction needs at least two classes.")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels)))

    @property
    def y(self) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[lab] for lab in self.labels])

    def subsample(self, n: int, seed: int = 0) -> LabelledSet:
        """At most ``n`` examples, balanced over classes as far as they allow, in a seeded random order."""
        if n >= len(self):
            return self
        rng = random.Random(seed)
        by_class: dict[str, list[int]] = {c: [] for c in self.classes}
        for i, lab in enumerate(self.labels):
            by_class[lab].append(i)
        for idx in by_class.values():
            rng.shuffle(idx)
        chosen: list[int] = []
        while len(chosen) < n:
            for idx in by_class.values():
                if idx and len(chosen) < n:
                    chosen.append(idx.pop())
        rng.shuffle(chosen)
        return LabelledSet([self.texts[i] for i in chosen], [self.labels[i] for i in chosen], self.name)


def sae_probes_dir() -> Path:
    """The folder of ``sae-probes``' labelled CSVs, found without importing the package."""
    package = find_package_dir("sae_probes")
    if package is None:
        raise InputError(f"The built-in labelled sets come from the package sae-probes; install it with "
                         f"`{SAE_PROBES_INSTALL}`, or give a CSV/JSONL file.")
    return package / "data" / "cleaned_data"


def builtin_names() -> list[str]:
    """Short names, then ``sae-probes:<stem>`` for every set of the installed package."""
    names = list(BUILTIN)
    try:
        names += sorted(f"sae-probes:{p.name.removesuffix('.csv.zst')}" for p in sae_probes_dir().glob("*.csv.zst"))
    except InputError:
        pass
    return names


def load_labelled(source: str | Path, *, limit: int | None = None, seed: int = 0, text_field: str | None = None,
                  label_field: str | None = None) -> LabelledSet:
    """A labelled set from a built-in name (``sst2``, ``cola``, ``spam``, ``sae-probes:<stem>``) or a file.

    ``limit`` keeps a seeded, class-balanced subsample of that many examples.
    """
    name = str(source)
    if name in BUILTIN or name.startswith("sae-probes:"):
        stem = BUILTIN.get(name) or name.removeprefix("sae-probes:")
        path = sae_probes_dir() / f"{stem}.csv.zst"
        if not path.exists():
            raise InputError(f"sae-probes has no set {stem!r}; `lmscope probe --list` shows the names.")
        data = _read_table(path, name, text_field, label_field)
    else:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{name!r} is neither a built-in labelled set ({', '.join(BUILTIN)}, "
                             "sae-probes:<stem>) nor an existing CSV/TSV/JSONL file.")
        data = _read_table(path, path.name, text_field, label_field)
    return data if limit is None else data.subsample(limit, seed)


def _open_text(path: Path) -> str:
    if path.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise InputError(f"{path.name} is zstd-compressed; install `zstandard` (pip install zstandard).") from None
        with open(path, "rb") as fh:
            return zstandard.ZstdDecompressor().stream_reader(fh).read().decode("utf-8")
    return path.read_text(encoding="utf-8")


def _pick(fields: list[str], given: str | None, candidates: tuple[str, ...], what: str, name: str) -> str:
    if given is not None:
        if given not in fields:
            raise InputError(f"{name}: no {what} column {given!r}; the columns are {fields}.")
        return given
    for c in candidates:
        if c in fields:
            return c
    raise InputError(f"{name}: cannot find a {what} column among {fields}; name it one of {candidates} or pass "
                     f"the column name explicitly.")


def _read_table(path: Path, name: str, text_field: str | None, label_field: str | None) -> LabelledSet:
    raw = _open_text(path)
    suffix = path.name.removesuffix(".zst").rsplit(".", 1)[-1].lower()
    if suffix in ("jsonl", "json"):
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{name}: line {n} is not valid JSON ({err.msg}).") from None
        fields = sorted({k for r in rows for k in r})
        first = 1
    elif suffix in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == "tsv" else ",")
        rows = list(reader)
        fields = list(reader.fieldnames or [])
        first = 2
    else:
        raise InputError(f"{name}: unknown file type {suffix!r}; use .csv, .tsv or .jsonl.")
    if not rows:
        raise InputError(f"{name} holds no examples.")
    tf = _pick(fields, text_field, _TEXT_FIELDS, "text", name)
    lf = _pick(fields, label_field, _LABEL_FIELDS, "label", name)
    texts, labels = [], []
    for i, r in enumerate(rows):
        text, label = r.get(tf), r.get(lf)
        if label is None or str(label).strip() == "":
            raise InputError(f"{name}: row {i + first} has no {lf!r} label; fill it in or drop the row.")
        if text is None or not str(text).strip():
            raise InputError(f"{name}: row {i + first} has an empty {tf!r} text.")
        texts.append(str(text).strip())  # sae-probes texts end in a space: the last token would be it
        labels.append(_label_str(label))
    return LabelledSet(texts, labels, name)


def _label_str(label) -> str:
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()
