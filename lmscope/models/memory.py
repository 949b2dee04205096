"""Memory matrices: the linear maps that model editing rewrites, and scoped, reversible weight edits.

ROME (Meng et al. 2022) reads a block's down projection as an associative memory ``v = W k``: the
key k is the matrix's input (``mlp.post``), the value v its output. Which matrix is the memory, and
which site holds its keys, is a property of the model's parts, named once in :data:`MEMORY_KINDS`:

* ``"mlp"``: the MLP down projection (``mlp.down`` of the block's MLP part); keys at ``mlp.post``;
* ``"ssm"``: a state-space block's output projection ``W_o`` (``out_proj``; Sen Sharma, Atkinson and
  Bau 2024 edit it in Mamba's middle layers): keys at ``ssm.y = s ⊙ SiLU(g)``, values the block's write;
* ``"wkv"``: RWKV's time-mix output projection: keys at ``wkv.y = r ⊙ wkv``, values the time mix's write.
  RWKV's channel mix is no ``"mlp"`` memory: its down projection's output is multiplied by a gate σ(r) that
  depends on the token, so ``v = W k`` is not what the block writes.

Each entry names its part, the site kind of the matrix's input (the keys), the site kind its output
writes (what causal tracing restores to choose the layer) and the block-relative module path; a new
kind of memory is one entry here, and the editing code does not change.

:class:`Memory` (from :meth:`lmscope.models.Model.memory`) gives the editing family what it needs
without touching the native modules: the weight as ``(d_out, d_in)`` whatever the storage (GPT-2's
Conv1D is stored transposed), a scoped shift of the matrix's output at chosen (row, position) cells
(for optimising a value), and in-place updates. :meth:`Model.edit` applies weight deltas and
returns an :class:`EditHandle`; ``undo()`` (or leaving its ``with`` block) copies back the saved
weights, so the model is bit-identical to before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmscope.errors import InputError, UnsupportedArchitectureError
from lmscope.models.parts import Adapter, get_module

if TYPE_CHECKING:
    from lmscope.models.model import Model


@dataclass(frozen=True)
class MemoryKind:
    """One kind of memory matrix: the adapter part it lives in, the site kind of its input (the keys), the
    site kind its output writes into the residual stream, and its block-relative module path."""

    name: str
    part: str
    key_kind: str
    write_kind: str
    module: Callable[[Adapter], str]


MEMORY_KINDS: dict[str, MemoryKind] = {
    "mlp": MemoryKind("mlp", "mlp", "mlp.post", "mlp_out", lambda a: a.block.mlp.down),
    "ssm": MemoryKind("ssm", "ssm", "ssm.y", "ssm_out", lambda a: a.block.mixer.out_proj),
    "wkv": MemoryKind("wkv", "wkv", "wkv.y", "wkv_out", lambda a: a.block.mixer.output),
}


def memory_kinds(adapter: Adapter) -> tuple[str, ...]:
    """The memory kinds a model built from ``adapter`` has, in table order (the first is the default)."""
    gated = adapter.block.mlp is not None and adapter.block.mlp.gate is not None  # RWKV: W k is not the write
    return tuple(k for k, mk in MEMORY_KINDS.items() if mk.part in adapter.parts and not (k == "mlp" and gated))


class Memory:
    """The memory matrix ``W`` (d_out × d_in, ``v = W k + b``) of one layer. Build with :meth:`Model.memory`."""

    def __init__(self, model: Model, layer: int, kind: str | None = None):
        kinds = memory_kinds(model.adapter)
        if not kinds:
            raise UnsupportedArchitectureError(
                f"{model.name} ({model.adapter.family}) has no memory matrix to edit: none of the parts "
                f"{sorted({mk.part for mk in MEMORY_KINDS.values()})} is in its blocks. Add its memory to "
                "MEMORY_KINDS in lmscope/models/memory.py.")
        kind = kinds[0] if kind is None else kind
        if kind not in kinds:
            raise InputError(f"memory kind {kind!r}: {model.name} has {', '.join(kinds)}.")
        if not -model.spec.n_layers <= layer < model.spec.n_layers:
            raise InputError(f"layer {layer}: {model.name} has layers 0..{model.spec.n_layers - 1}.")
        self.layer = layer % model.spec.n_layers
        self.kind = kind
        self.key_site = f"blocks.{self.layer}.{MEMORY_KINDS[kind].key_kind}"
        self.write_kind = MEMORY_KINDS[kind].write_kind
        self._module = get_module(model.block(self.layer), MEMORY_KINDS[kind].module(model.adapter))
        self._conv1d = model.adapter.linear == "conv1d"

    @property
    def name(self) -> str:
        """``blocks.{layer}.{kind}``: the key under which edits store this matrix's delta."""
        return f"blocks.{self.layer}.{self.kind}"

    @property
    def param(self) -> torch.nn.Parameter:
        return self._module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in)."""
        w = self.param
        return (w.shape[1], w.shape[0]) if self._conv1d else (w.shape[0], w.shape[1])

    def weight(self) -> torch.Tensor:
        """A float32 copy of W as (d_out, d_in), so that ``v = W @ k`` (GPT-2's Conv1D transposed back)."""
        w = self.param.detach()
        return (w.T if self._conv1d else w).float().clone()

    def add_(self, delta_OI: torch.Tensor) -> None:
        """W += delta (d_out, d_in), in place, in the weight's own dtype and layout."""
        if tuple(delta_OI.shape) != self.shape:
            raise InputError(f"delta of shape {tuple(delta_OI.shape)} for {self.name} of shape {self.shape}.")
        w = self.param
        d = delta_OI.T if self._conv1d else delta_OI
        with torch.no_grad():
            w.add_(d.to(device=w.device, dtype=w.dtype))

    @contextlib.contextmanager
    def shifted(self, delta_O: torch.Tensor, rows: Sequence[int], positions: Sequence[int]) -> Iterator[None]:
        """Within the block, add ``delta_O`` (d_out,) to the matrix's output at cells (rows[i], positions[i]).

        Gradients flow to ``delta_O``; the hook is removed on exit, also on an exception.
        """
        r = torch.as_tensor(list(rows), dtype=torch.long)
        p = torch.as_tensor(list(positions), dtype=torch.long)

        def hook(module, args, out):
            add = torch.zeros_like(out)
            add[r.to(out.device), p.to(out.device)] = delta_O.to(out.dtype).expand(len(r), -1)
            return out + add

        handle = self._module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


class EditHandle:
    """Weight deltas applied to a model; ``undo()`` (or leaving ``with``) restores the saved weights exactly.

    Undo edits in the reverse order of applying them: undoing an edit whose matrices were changed since
    (by a later edit) raises, because restoring it would silently drop the later change.
    """

    def __init__(self, model: Model, deltas: Mapping[str, torch.Tensor]):
        self._saved: list[tuple[Memory, torch.Tensor, torch.Tensor]] = []  # (matrix, before, after)
        mems = [(memory_from_name(model, name), d) for name, d in deltas.items()]
        for mem, d in mems:  # validate every delta before changing anything
            if tuple(d.shape) != mem.shape:
                raise InputError(f"edit delta for {mem.name} has shape {tuple(d.shape)}, the matrix {mem.shape}.")
        for mem, d in mems:
            saved = mem.param.detach().clone()
            mem.add_(d)
            self._saved.append((mem, saved, mem.param.detach().clone()))
        self.names = tuple(deltas)
        self.active = True

    def undo(self) -> None:
        """Copy the saved weights back (bit-identical); a second call does nothing."""
        if not self.active:
            return
        for mem, _, after in self._saved:
            if not torch.equal(mem.param.detach(), after):
                raise InputError(f"{mem.name} changed after this edit was applied (a later edit?); undo the later "
                                 "edits first (reverse order).")
        with torch.no_grad():
            for mem, saved, _ in reversed(self._saved):
                mem.param.copy_(saved)
        self._saved = []
        self.active = False

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def memory_from_name(model: Model, name: str) -> Memory:
    """The memory named ``blocks.{layer}.{kind}``."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise InputError(f"memory name {name!r}: use 'blocks.<layer>.<kind>', e.g. 'blocks.5.mlp'.")
    return Memory(model, int(parts[1]), parts[2])


def edit_deltas(edit) -> Mapping[str, torch.Tensor]:
    """The ``{memory name: delta (d_out, d_in)}`` of an edit: a mapping, or an object with ``deltas``."""
    deltas = edit if isinstance(edit, Mapping) else getattr(edit, "deltas", None)
    if not isinstance(deltas, Mapping):
        raise InputError("model.edit takes an edit (lmscope.editing.rome(...)) or {memory name: delta}.")
    return deltas
