"""Forwards kept for reuse: while a :class:`RunMemo` is active, a plain :meth:`Model.run` of one prompt is
answered from a stored forward of the same prompt when that forward recorded every site asked for.

The web app activates one around each call it computes, so clicking the nodes of a graph reads the forward
the graph already ran instead of running another (``flow-graph`` and ``flow-node`` ask for the same sites:
:func:`lmscope.localization.flow.graph_run`).

Answers are exactly a fresh run's: a stored forward is reused only for the same text and the same set of
layers whose attention (or scan) takes the explicit path (recording ``attn.pattern`` at a layer switches it
from the fused kernel to the explicit one, which rounds differently), and recording more sites changes no
value (hooks that only record return what they were given). A hit hands out copies of the asked-for
tensors (and the auxiliary post-norm factors a fresh run would record with them), so callers may change
them. Runs with interventions, gradients or several prompts always run.

Values computed from a stored forward alone (and the model's weights) can be kept with it
(:func:`derived`, ``Model.derived``): the contribution graph keeps each layer's importances, so a click on an
attention edge reads them instead of decomposing the layer again. They go when their forward goes.

A miss runs one forward recording what was asked plus what the stored forward of that text and path
already held (so the sites only grow); entries are dropped least recently used past ``max_bytes``, and a
forward larger than that is not kept. The memo is active only in the thread (or task) that entered it.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from lmscope.models.batch import Batch, RunOutput, select_logits
from lmscope.sites import ATTN_INNER_KINDS, SSM_INNER_KINDS, Site, parse_site

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("lmscope_run_memo", default=None)
AUX_FROM = {"attn_write_factor": "attn.head_out", "mlp_write_factor": "mlp.post"}  # aux entry -> the site recording it


@dataclass
class _Entry:
    batch: Batch
    logits: torch.Tensor
    cache: dict
    sites: frozenset
    nbytes: int
    derived: dict = field(default_factory=dict)  # values computed from this forward alone (see derived())


def active(model) -> RunMemo | None:
    """The memo active in this thread for ``model``, if any."""
    memo = _ACTIVE.get()
    return memo if memo is not None and memo.model is model else None


class RunMemo:
    """Stored forwards of single prompts for ``model`` (see the module doc); ``with memo:`` activates it."""

    def __init__(self, model, max_bytes: int = 2 << 30):
        self.model, self.max_bytes = model, max_bytes
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._tokens: list[contextvars.Token] = []
        self.hits = self.misses = 0

    def __enter__(self) -> RunMemo:
        self._tokens.append(_ACTIVE.set(self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._tokens.pop())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _explicit(self, sites: set[Site]) -> frozenset:
        inner = SSM_INNER_KINDS if "ssm" in self.model.parts else ATTN_INNER_KINDS
        return frozenset(s.layer for s in sites if s.layer is not None and s.kind in inner)

    def run(self, text: str, cache, logits: str, padding_side: str) -> RunOutput:
        """A plain run of ``text`` recording ``cache``: from a stored forward when one holds it."""
        n_layers = self.model.spec.n_layers
        sites = {parse_site(s, n_layers) for s in cache}
        key = (text, self._explicit(sites))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and sites <= entry.sites:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                entry = None
        if entry is None:
            with self._lock:
                held = self._entries[key].sites if key in self._entries else frozenset()
            wanted = frozenset(sites | held)
            out = self.model.run_plain(text, cache=wanted, logits="all", padding_side=padding_side)
            nbytes = out.logits.numel() * out.logits.element_size() + sum(
                t.numel() * t.element_size() for t in out.cache.values())
            entry = _Entry(out.batch, out.logits, out.cache, wanted, nbytes)
            with self._lock:
                self.misses += 1
                self._entries.pop(key, None)
                if nbytes <= self.max_bytes:
                    self._entries[key] = entry
                    while sum(e.nbytes for e in self._entries.values()) > self.max_bytes:
                        self._entries.popitem(last=False)
        names = {s.name for s in sites}
        layers = {s.layer for s in sites if s.layer is not None}
        picked = {}
        for name, t in entry.cache.items():
            if name.startswith("aux."):
                _, _, layer, what = name.split(".", 3)
                if int(layer) not in layers or Site(AUX_FROM.get(what, ""), int(layer)) not in sites:
                    continue
            elif name not in names:
                continue
            picked[name] = t.clone()
        return RunOutput(entry.batch, select_logits(entry.logits, entry.batch, logits).clone()
                         if logits != "none" else None, picked, memo_slot=(self, entry))


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def derived(run: RunOutput, key, compute):
    """``compute()``, a value that depends only on the forward ``run`` and the model's weights (``key`` names
    it and every setting it depends on): kept with the stored forward when ``run`` was read from a
    :class:`RunMemo`, so the next call on that forward reads it back instead of computing it again; computed
    and not kept for a forward of its own. Callers must not change what they get (it is shared)."""
    slot = run.memo_slot
    if slot is None:
        return compute()
    memo, entry = slot
    with memo._lock:
        if key in entry.derived:
            return entry.derived[key]
    value = compute()
    with memo._lock:
        entry.derived[key] = value
        entry.nbytes += _nbytes(value)
    return value
