"""An edit as data: weight deltas of memory matrices, the facts they write, and the model they belong to.

An :class:`Edit` changes nothing by itself. ``model.edit(e)`` applies it and returns a handle whose
``undo()`` (or the end of its ``with`` block) restores the weights bit-identically. Edits save to a
small safetensors file (one tensor per edited matrix, ``blocks.{layer}.{kind}``, plus JSON metadata:
the facts, the model name and its fingerprint, the method's details). Loading checks the fingerprint:
an edit computed on another model is refused with an error, unless ``check=False``.

Rank-one deltas are stored as their two factors when that is smaller (ROME's ΔW = r uᵀ).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmscope.editing.second_moment import weights_fingerprint
from lmscope.errors import InputError
from lmscope.models import Model

FORMAT = "lmscope-edit/1"


@dataclass
class Edit:
    """``deltas``: {memory name ``blocks.{l}.{kind}``: ΔW (d_out, d_in)}; ``facts``: what it writes."""

    deltas: dict[str, torch.Tensor]
    model: str
    fingerprint: str
    facts: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: Model, deltas: Mapping[str, torch.Tensor], facts: Sequence = (), meta: dict | None = None
                  ) -> Edit:
        return cls(dict(deltas), model.name, weights_fingerprint(model), list(facts), dict(meta or {}))

    def check(self, model: Model) -> None:
        """Raise unless this edit was computed on ``model`` (same fingerprint)."""
        fp = weights_fingerprint(model)
        if fp != self.fingerprint:
            raise InputError(f"This edit was computed on {self.model!r} (fingerprint {self.fingerprint}), not on "
                             f"{model.name!r} (fingerprint {fp}). Recompute it on this model, or load it with "
                             "check=False if you know the weights match.")

    def __add__(self, other: Edit) -> Edit:
        """Both edits' deltas summed (for one ``model.edit`` of several facts)."""
        if other.fingerprint != self.fingerprint:
            raise InputError("Cannot combine edits computed on different models.")
        deltas = dict(self.deltas)
        for k, d in other.deltas.items():
            deltas[k] = deltas[k] + d if k in deltas else d
        return Edit(deltas, self.model, self.fingerprint, self.facts + other.facts,
                    {"method": "combined", "parts": [self.meta, other.meta]})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tensors = {}
        for name, d in self.deltas.items():
            tensors[name] = d.contiguous()
        facts = [f.__dict__ if hasattr(f, "__dict__") else f for f in self.facts]
        meta = {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
                "facts": json.dumps(facts), "meta": json.dumps(self.meta, default=str)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path


def load_edit(path: str | os.PathLike, model: Model | None = None, *, check: bool = True) -> Edit:
    """An :class:`Edit` from ``path``; with ``model`` (and ``check``), refused unless it was computed on it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"No edit file {path}; save one with Edit.save(path) or `lmscope edit --save PATH`.")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not an lmscope edit (format {meta.get('format')!r}, expected {FORMAT!r}).")
    from lmscope.editing.rome import Fact

    facts = [Fact(**f) if isinstance(f, dict) and set(f) == {"prompt", "subject", "target"} else f
             for f in json.loads(meta["facts"])]
    edit = Edit(load_file(str(path)), meta["model"], meta["fingerprint"], facts, json.loads(meta["meta"]))
    if model is not None and check:
        edit.check(model)
    return edit
