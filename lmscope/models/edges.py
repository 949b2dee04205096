"""Edge-level access: every receiver (each head's q, k and v input, each MLP input, the logits) gets
its own copy of the residual stream, so that single edges can be patched and differentiated.

The component graph (EAP, EAP-IG, ACDC) is built from the parts the model has: upstream nodes
``input`` (the embedding as block 0 sees it), each head's write ``a{l}.h{h}`` and each MLP's write
``m{l}``, and receivers ``a{l}.h{h}.q|k|v``, ``m{l}`` and ``logits``; a model without MLPs (the
attention-only model) has no ``m{l}`` nodes. The input of a receiver is the sum of the writes of the
nodes before it (plus biases), so with a boolean mask P (U, R) of patched edges

    in_v = x(run) − Σ_u P[u, v] · (z_u(run) − z_u(corrupt))

where x(run) is the residual stream the receiver reads in this run. :func:`edge_forward` runs the
native model with that rule applied: a hook on the pre-attention norm builds the 3H per-receiver
inputs of the layer and normalises each, hooks on the q/k/v projections compute each head's
projection from its own input (grouped-query heads are ungrouped: every query head gets its own key
and value), and pre-hooks on the pre-MLP norm and the final norm replace their inputs. With
``grad=True`` the per-receiver inputs stay in the autograd graph, and one backward pass
(:meth:`EdgeRun.receiver_grads`) gives ∂M/∂in_v for every receiver at once.

The norm modules before attention and before the MLP are the block's ``pre_mixer`` and ``pre_mlp``
norms of the model's adapter parts. Post-norm models (Gemma 2/3) break the additive-residual
assumption slightly: a head's write includes its block's post-norm factor from the current run.

Shapes: U upstream nodes, R receivers, B prompts, T tokens, D residual width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmscope.errors import InputError
from lmscope.interventions import Intervention
from lmscope.models.parts import get_module, linear_weight
from lmscope.models.hooks import HookSession

if TYPE_CHECKING:
    from lmscope.models.model import Batch, Model

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class EdgeGraph:
    """Node names, layers and which upstream → receiver edges exist (``valid`` (U, R))."""

    upstream: tuple[str, ...]
    receivers: tuple[str, ...]
    up_layer: tuple[int, ...]  # -1 for the input
    valid: torch.Tensor
    n_layers: int
    n_heads: int
    has_mlp: bool = True

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @property
    def up_stride(self) -> int:
        """Upstream nodes per layer: the heads and, where the block has one, the MLP."""
        return self.n_heads + int(self.has_mlp)

    @property
    def rec_stride(self) -> int:
        """Receivers per layer: each head's q, k and v, and the MLP."""
        return 3 * self.n_heads + int(self.has_mlp)

    def _need_mlp(self) -> None:
        if not self.has_mlp:
            raise InputError("This edge graph has no MLP nodes: the model's blocks have no MLP.")

    def head_index(self, layer: int, head: int) -> int:
        return 1 + layer * self.up_stride + head

    def mlp_index(self, layer: int) -> int:
        self._need_mlp()
        return 1 + layer * self.up_stride + self.n_heads

    def receiver_index(self, layer: int, kind: str, head: int | None = None) -> int:
        """Receiver column of ``a{layer}.h{head}.{q|k|v}`` or ``m{layer}`` (kind "mlp")."""
        base = layer * self.rec_stride
        if kind == "mlp":
            self._need_mlp()
            return base + 3 * self.n_heads
        return base + QKV.index(kind) * self.n_heads + head

    def attn_receivers(self, layer: int) -> slice:
        base = layer * self.rec_stride
        return slice(base, base + 3 * self.n_heads)


def _has_mlp(model: Model) -> bool:
    return "mlp" in model.parts


def edge_graph(model: Model) -> EdgeGraph:
    """The component graph of ``model``: heads and (where the blocks have them) MLPs, with q/k/v receivers
    split per head."""
    model.require(["attn.head_out"], "The edge graph (EAP, EAP-IG, ACDC)")
    s, has_mlp = model.spec, _has_mlp(model)
    mlp_up = lambda layer: [f"m{layer}"] if has_mlp else []  # noqa: E731
    up, up_layer = ["input"], [-1]
    for layer in range(s.n_layers):
        up += [f"a{layer}.h{h}" for h in range(s.n_heads)] + mlp_up(layer)
        up_layer += [layer] * (s.n_heads + int(has_mlp))
    rec = []
    for layer in range(s.n_layers):
        rec += [f"a{layer}.h{h}.{w}" for w in QKV for h in range(s.n_heads)] + mlp_up(layer)
    rec.append("logits")
    valid = torch.zeros(len(up), len(rec), dtype=torch.bool)
    is_mlp = torch.tensor([u.startswith("m") for u in up])
    layer_t = torch.tensor(up_layer)
    stride = 3 * s.n_heads + int(has_mlp)
    for layer in range(s.n_layers):
        base = layer * stride
        valid[:, base:base + 3 * s.n_heads] = (layer_t < layer)[:, None]
        if has_mlp:
            same_layer_heads = (layer_t == layer) & ~is_mlp & (not s.parallel)
            valid[:, base + 3 * s.n_heads] = (layer_t < layer) | same_layer_heads
    valid[:, -1] = True
    return EdgeGraph(tuple(up), tuple(rec), tuple(up_layer), valid, s.n_layers, s.n_heads, has_mlp)


def upstream_sites(model: Model) -> list[str]:
    n, kinds = model.spec.n_layers, ("attn.head_out", "mlp_out") if _has_mlp(model) else ("attn.head_out",)
    return ["embed"] + [f"blocks.{l}.{k}" for l in range(n) for k in kinds]


def stack_upstream(model: Model, cache: dict, upto_layer: int | None = None, *,
                   include_heads_of: int | None = None) -> torch.Tensor:
    """(U', B, T, D) writes of the upstream nodes from a run's cache, in graph order.

    With ``upto_layer`` only the nodes of layers below it (and the input); ``include_heads_of``
    adds that layer's heads.
    """
    n = model.spec.n_layers if upto_layer is None else upto_layer
    has_mlp = _has_mlp(model)
    parts = [cache["embed"].unsqueeze(0)]
    for layer in range(n):
        parts.append(cache[f"blocks.{layer}.attn.head_out"].permute(2, 0, 1, 3))
        if has_mlp:
            parts.append(cache[f"blocks.{layer}.mlp_out"].unsqueeze(0))
    if include_heads_of is not None:
        parts.append(cache[f"blocks.{include_heads_of}.attn.head_out"].permute(2, 0, 1, 3))
    return torch.cat(parts)


def _upstream_chunk(model: Model, cache: dict, graph: EdgeGraph, start: int) -> torch.Tensor:
    """(n, B, T, D) writes of the upstream nodes from index ``start``: the input, one layer's heads, or one MLP."""
    if start == 0:
        return cache["embed"].unsqueeze(0)
    layer, offset = divmod(start - 1, graph.up_stride)
    if offset == 0:
        return cache[f"blocks.{layer}.attn.head_out"].permute(2, 0, 1, 3)
    return cache[f"blocks.{layer}.mlp_out"].unsqueeze(0)


def upstream_values(model: Model, batch: Batch, interventions=()) -> torch.Tensor:
    """(U, B, T, D) writes of every upstream node in a plain run (no gradient)."""
    with torch.no_grad():
        run = model.run(batch, cache=upstream_sites(model), interventions=interventions, logits="none")
    return stack_upstream(model, run.cache)


@dataclass
class EdgeRun:
    """What :func:`edge_forward` returns: last-position logits (B, V) or all (B, T, V), the
    per-receiver inputs (in the autograd graph when ``grad=True``) and the cache."""

    logits: torch.Tensor
    attn_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (3H, B, T, D)
    mlp_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, T, D); none without MLPs
    final_input: torch.Tensor | None = None  # (B, T, D)
    cache: dict = field(default_factory=dict)

    def receiver_inputs(self) -> list[torch.Tensor]:
        """The per-receiver input tensors in graph order: per layer (3H, B, T, D) then the MLP's (B, T, D)
        where there is one; finally the logits' input (B, T, D)."""
        out = []
        for layer in sorted(self.attn_inputs):
            out += [self.attn_inputs[layer]] + ([self.mlp_inputs[layer]] if layer in self.mlp_inputs else [])
        return out + [self.final_input]

    def receiver_grads(self, value: torch.Tensor) -> torch.Tensor:
        """(R, B, T, D) ∂value/∂in_v for every receiver (needs ``grad=True``); no parameter grads."""
        ins = self.receiver_inputs()
        grads = torch.autograd.grad(value, ins, allow_unused=True)
        parts = [(g if g is not None else torch.zeros_like(x)).reshape(-1, *x.shape[-3:])
                 for g, x in zip(grads, ins)]
        return torch.cat(parts).detach()


def _proj_columns(model: Model) -> list[tuple[str, list[tuple[int, torch.Tensor]]]]:
    """For each projection module: (path, [(receiver offset within the layer, source columns)]).

    Receiver offsets follow the graph: which * H + head. Source columns index the module's native
    output; the module's new output concatenates the receivers' columns in list order.
    """
    a, s = model.adapter.block.mixer, model.spec
    dh, h_n = s.d_head, s.n_heads
    ar = torch.arange(dh)
    if a.qkv is None:
        out = []
        for w, path in enumerate((a.q_proj, a.k_proj, a.v_proj)):
            groups = 1 if w == 0 else h_n // s.n_kv_heads
            out.append((path, [(w * h_n + h, (h // groups) * dh + ar) for h in range(h_n)]))
        return out
    cols = []
    for w in range(3):
        for h in range(h_n):
            if a.qkv_layout == "blocks":
                c = w * h_n * dh + h * dh + ar
            else:
                c = h * 3 * dh + w * dh + ar
            cols.append((w * h_n + h, c))
    if a.qkv_layout == "per_head":  # NeoX reads [q|k|v] per head: keep that order
        cols.sort(key=lambda rc: (rc[0] % h_n, rc[0] // h_n))
    return [(a.qkv, cols)]


def _check_supported(model: Model) -> tuple[str, str | None]:
    """(norm before attention, norm before the MLP or None): block-relative paths from the adapter's parts."""
    model.require(["attn.head_out"], "Edge-level patching (EAP, EAP-IG, ACDC)")
    norms = model.adapter.block.norms
    return norms.pre_mixer, norms.pre_mlp


def edge_forward(model: Model, batch: Batch, *, patch: torch.Tensor | None = None,
                 corrupt: torch.Tensor | None = None, grad: bool = False,
                 interventions: tuple[Intervention, ...] | list[Intervention] = (),
                 last_only: bool = True) -> EdgeRun:
    """One native forward with per-receiver inputs.

    patch: (U, R) bool, True where the edge carries the corrupted value (needs ``corrupt``, the
    (U, B, T, D) upstream writes of the corrupted run, from :func:`upstream_values`).
    grad: keep per-receiver inputs in the autograd graph (for EAP).
    interventions: applied as in :meth:`Model.run` (e.g. a Patch of ``embed`` for EAP-IG).
    """
    graph = edge_graph(model)
    attn_norm_path, mlp_norm_path = _check_supported(model)
    s, a = model.spec, model.adapter
    h_n = s.n_heads
    if patch is not None:
        if corrupt is None:
            raise InputError("edge_forward(patch=...) needs corrupt=, the upstream writes of the corrupted run "
                             "(lmscope.models.edges.upstream_values).")
        patch = patch & graph.valid
        if not patch.any():
            patch = None
    sites = list(upstream_sites(model)) if patch is not None else []
    # explicit attention everywhere: keys/values arrive ungrouped (one per query head)
    sites += [f"blocks.{l}.attn.pattern" for l in range(s.n_layers)] if s.n_kv_heads != s.n_heads else []
    run = EdgeRun(logits=torch.empty(0))
    proj_cols = _proj_columns(model)
    handles = []
    state: dict = {}

    # z_u(run) − z_u(corrupt) of the upstream nodes in graph order, each chunk (the input, one layer's heads,
    # one MLP) computed once per run when first needed (its nodes have run by then); without gradients they
    # go into one buffer, so that each receiver group's patched deltas are one matrix product
    done = [0]
    chunks: list[torch.Tensor] = []
    buffer: list[torch.Tensor] = []

    def deltas(session, n_up: int) -> torch.Tensor:
        """(n_up, B, T, D) the deltas of the first ``n_up`` upstream nodes."""
        while done[0] < n_up:
            z = _upstream_chunk(model, session.cache, graph, done[0])
            d = z - corrupt[done[0]:done[0] + len(z)].to(z)
            if grad:
                chunks.append(d)
            else:
                if not buffer:
                    buffer.append(torch.empty((len(graph.upstream), *d.shape[1:]), dtype=d.dtype, device=d.device))
                buffer[0][done[0]:done[0] + len(d)] = d
            done[0] += len(d)
        if grad:
            out = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            return out[:n_up]
        return buffer[0][:n_up]

    def patched_input(x: torch.Tensor, cols: slice | int, layer: int | None, session, heads_of: int | None):
        """The patched deltas Σ_u P[u, v] (z_u(run) − z_u(corrupt)) for receiver columns ``cols`` ((R', B, T, D),
        subtracted from x by the caller), or None if no edge into them is patched."""
        if patch is None:
            return None
        w = patch[:, cols]
        w = w.unsqueeze(1) if w.ndim == 1 else w
        n_up = w.shape[0] if layer is None else (1 + layer * graph.up_stride + (h_n if heads_of is not None else 0))
        w = w[:n_up]
        if not w.any():
            return None
        d = deltas(session, n_up)
        return (w.T.to(d) @ d.flatten(1)).view(w.shape[1], *d.shape[1:])

    def attn_norm_hook(layer, session):
        def hook(module, args, output):
            x = args[0]
            cols = graph.attn_receivers(layer)
            ins = x.unsqueeze(0).repeat(3 * h_n, *[1] * x.ndim)
            d = patched_input(x, cols, layer, session, None)
            if d is not None:
                ins = ins - d
            run.attn_inputs[layer] = ins
            state["normed"] = module.forward(ins)
            return output
        return hook

    def proj_hook(cols):
        def hook(module, args, output):
            normed = state["normed"]  # (3H, B, T, D)
            parts = []
            for r, src in cols:
                y = _linear(module, normed[r], a.linear, src.to(normed.device))
                parts.append(y)
            return torch.cat(parts, dim=-1)
        return hook

    def mlp_norm_hook(layer, session):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            col = graph.receiver_index(layer, "mlp")
            new = x.clone()
            d = patched_input(x, col, layer, session, None if s.parallel else layer)
            if d is not None:
                new = new - d[0]
            run.mlp_inputs[layer] = new
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    def final_hook(session):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = x.clone()
            d = patched_input(x, -1, None, session, None)
            if d is not None:
                new = new - d[0].to(x)
            run.final_input = new
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    session = HookSession(model, sites, [(None, iv) for iv in interventions], grad=grad)
    try:
        with session:
            for layer in range(s.n_layers):
                block = model.block(layer)
                handles.append(get_module(block, attn_norm_path).register_forward_hook(attn_norm_hook(layer, session)))
                for path, cols in proj_cols:
                    handles.append(get_module(block, path).register_forward_hook(proj_hook(cols)))
                if mlp_norm_path is not None:
                    handles.append(get_module(block, mlp_norm_path).register_forward_pre_hook(
                        mlp_norm_hook(layer, session), with_kwargs=True))
            handles.append(model.final_norm.register_forward_pre_hook(final_hook(session), with_kwargs=True))
            with torch.set_grad_enabled(grad):
                kw = {"logits_to_keep": 1} if last_only and batch.padding_side == "left" else {}
                out = model.forward(batch, **kw)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits
    if last_only:
        logits = logits[:, -1] if batch.padding_side == "left" else \
            logits[torch.arange(logits.shape[0]), batch.last_index.to(logits.device)]
    run.logits = logits
    run.cache = session.cache
    return run


def _linear(module, x: torch.Tensor, kind: str, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` of a linear (or GPT-2 Conv1D) layer's output for input ``x``."""
    w = linear_weight(module, kind)[:, cols]  # (in, c)
    y = x @ w.to(x.dtype)
    b = getattr(module, "bias", None)
    return y if b is None else y + b[cols].to(x.dtype)
