"""The hook engine: cache sites and apply interventions during one native forward pass.

A :class:`HookSession` is a context manager. On entry it attaches PyTorch hooks to exactly the
modules the requested sites need (and, for q/k/v/pattern sites, installs the explicit attention
path on those layers only); on exit it removes every hook it added, also when an exception flies.
Interventions carry an optional row range, which is how a batched run applies N intervention
sets to N copies of a batch in one forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from lmscope.errors import SiteError
from lmscope.interventions import Intervention, Knockout
from lmscope.models.norms import norm_gain, norm_scale
from lmscope.models.parts import get_module
from lmscope.models.attention import ATTN_ATTR, _explicit, explicit_attention
from lmscope.models.reuse import Expansion, Prefix
from lmscope.models.ssm import explicit_mixer
from lmscope.models.ssm2 import explicit_mixer2
from lmscope.models import wkv as _wkv
from lmscope.sites import ATTN_INNER_KINDS, SSM_INNER_KINDS, Site, parse_site

if TYPE_CHECKING:
    from lmscope.models.model import Model

Rows = slice | None


class HookSession:
    """Hooks for one or more forwards of ``model``: caches ``cache`` sites, applies interventions.

    ``interventions`` is a list of ``(rows, intervention)``; ``rows=None`` means every batch row.
    After the forward, ``session.cache`` maps canonical site names to tensors (detached unless
    ``grad=True``, in which case they stay in the graph and keep their ``.grad``).

    ``expand=(layer, n, b)`` makes the forward start with a batch of b rows and repeat it n times
    (set-major) at the input of block ``layer``: the blocks below run once for all n copies. Only
    interventions at or above that layer may then target rows of the copies. ``expand`` may also be
    an :class:`~lmscope.models.reuse.Expansion` (copies appended at several blocks).

    ``prefix`` (a :class:`~lmscope.models.reuse.Prefix`) makes the forward cover positions
    ``prefix.start``..T−1 only: every layer's attention prepends the base run's keys/values of the
    earlier positions. ``capture_kv=True`` records every layer's keys, values and mask into
    ``session.prefix`` (for a later prefix forward).
    """

    def __init__(
        self,
        model: Model,
        cache: Iterable[str | Site] = (),
        interventions: Iterable[tuple[Rows, Intervention]] = (),
        grad: bool = False,
        expand: tuple[int, int, int] | Expansion | None = None,
        prefix: Prefix | None = None,
        capture_kv: bool = False,
    ):
        self.model = model
        if isinstance(expand, tuple):
            first, n, b = expand
            expand = Expansion(b, {first: n})
        self.expand = expand
        self.prefix = prefix
        self.capture_kv = capture_kv
        if capture_kv:
            self.prefix = Prefix()
        self.grad = grad
        n_layers = model.spec.n_layers
        self.cache_sites: set[Site] = {parse_site(s, n_layers) for s in cache}
        self.ivs: dict[Site, list[tuple[Rows, Intervention]]] = defaultdict(list)
        self.knockouts: dict[int, list[tuple[Rows, Knockout]]] = defaultdict(list)
        for rows, iv in interventions:
            if isinstance(iv, Knockout):
                site = parse_site(iv.site, n_layers)
                self.knockouts[site.layer].append((rows, iv))
            else:
                site = parse_site(iv.site, n_layers)
                if site.kind == "final.scale":
                    raise SiteError("final.scale can be read but not intervened on; intervene on the residual.")
                self.ivs[site].append((rows, iv))
        self.ssm = "ssm" in model.parts  # a state-space model: knockouts act on the scan
        self.wkv = "wkv" in model.parts  # RWKV: every block's time and channel mix run lmscope's masked path
        self._mask: torch.Tensor | None = None  # the forward's attention mask (B, T), for the RWKV path
        knock = "ssm.out" if self.ssm else "attn.pattern"
        kinds = {s.kind for s in self.cache_sites | set(self.ivs)} | ({knock} if self.knockouts else set())
        model.require(sorted(kinds))
        self.cache: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._attn_modules: list = []
        self._mixers: list = []
        self._stash: dict[tuple[int, str], torch.Tensor] = {}

    # ------------------------------------------------------------------ core step
    def wants(self, site: Site) -> bool:
        return site in self.cache_sites or site in self.ivs

    def apply(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """``x`` with this site's interventions applied (nothing cached)."""
        ivs = self.ivs.get(site)
        if ivs:
            x = x.clone()
            for rows, iv in ivs:
                if rows is None:
                    x = iv.apply(x)
                else:
                    x[rows] = iv.apply(x[rows])
        return x

    def process(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """Apply this site's interventions to ``x`` and cache it if asked; return the new value."""
        x = self.apply(site, x)
        if site in self.cache_sites:
            self._store(site.name, x)
        return x

    def token_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(rows, T, 1) real-token mask of the current forward for ``hidden`` (rows, T, D), the batch's mask repeated
        over copies of the batch; None when no token is padding."""
        mask = self._mask
        if mask is None or bool(mask.all()):
            return None
        if mask.shape[1] != hidden.shape[1]:
            raise RuntimeError(f"The attention mask covers {mask.shape[1]} tokens but the block sees {hidden.shape[1]}.")
        mask = mask.repeat(hidden.shape[0] // mask.shape[0], 1)
        return mask[:, :, None].to(device=hidden.device, dtype=hidden.dtype)

    def _store(self, name: str, x: torch.Tensor) -> None:
        if self.grad:
            if x.requires_grad and x.grad_fn is not None:
                x.retain_grad()
            self.cache[name] = x
        else:
            self.cache[name] = x.detach()

    # ------------------------------------------------------------------ registration
    def __enter__(self) -> HookSession:
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._attn_modules:
            if getattr(module, ATTN_ATTR, None) is not None:
                delattr(module, ATTN_ATTR)
        self._attn_modules.clear()
        for module in self._mixers:
            module.__dict__.pop("forward", None)
        self._mixers.clear()
        self._stash.clear()

    def _register(self) -> None:
        m, a = self.model, self.model.adapter
        wanted = self.cache_sites | set(self.ivs)
        kinds_by_layer: dict[int, set[str]] = defaultdict(set)
        for s in wanted:
            if s.layer is not None:
                kinds_by_layer[s.layer].add(s.kind)
        for layer in self.knockouts:
            kinds_by_layer[layer].add("knockout")
        if Site("embed") in wanted:
            kinds_by_layer[0].add("embed")
        if self.wkv:
            self._handles.append(m.hf.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        if self.expand is not None:
            for layer in range(self.expand.first, m.spec.n_layers):
                self._hook_pre(m.block(layer), self._expand_pre(layer))

        inner = {*SSM_INNER_KINDS, "knockout"} if self.ssm else {*ATTN_INNER_KINDS, "knockout"}
        explicit = {layer for layer, kinds in kinds_by_layer.items() if kinds & inner}
        every = self.prefix is not None
        if (self.ssm or self.wkv) and every:
            raise RuntimeError("Prefix reuse needs attention keys and values; a recurrent model has none.")
        if self.ssm:
            self._explicit_mixers(explicit)
        if self.wkv:
            self._mixers.extend(_wkv.install(self))
        for layer in () if self.ssm or self.wkv else range(m.spec.n_layers) if every else sorted(explicit):
            attn = get_module(m.block(layer), a.block.mixer.module)
            if getattr(attn, ATTN_ATTR, None) is not None:
                raise RuntimeError("Another lmscope hook session is active on this model; nest runs instead.")
            setattr(attn, ATTN_ATTR, self._attention(layer, layer in explicit))
            self._attn_modules.append(attn)
        for layer, kinds in kinds_by_layer.items():
            block = m.block(layer)
            if kinds & {"embed", "resid_pre", "resid_mid"}:
                if layer == 0 and a.embedding.norm is not None:  # the stream starts after the embeddings' norm
                    self._hook_fwd(get_module(block, a.embedding.norm), self._embedding_norm)
                else:
                    self._hook_pre(block, self._block_pre(layer))
            if kinds & {"attn.z", "attn.head_out"}:
                self._hook_pre(get_module(block, a.block.mixer.o_proj), self._o_proj_pre(layer))
            for write in {"ssm_out", "wkv_out"} & kinds:  # before resid_mid (RWKV), which adds the write to resid_pre
                self._hook_fwd(get_module(block, a.block.mixer.module), self._site_output(Site(write, layer)))
            if kinds & {"attn_out", "attn.head_out", "resid_mid"}:
                self._hook_fwd(get_module(block, a.block.mixer_write), self._attn_write(layer))
            if "mlp.post" in kinds:
                self._hook_pre(get_module(block, a.block.mlp.down), self._mlp_down_pre(layer))
                if m.spec.post_norms:
                    self._hook_fwd(get_module(block, a.block.mlp_write), self._mlp_write_scale(layer))
                if a.block.mlp.gate is not None:
                    self._hook_fwd(get_module(block, a.block.mlp.gate), self._mlp_gate(layer))
            if "mlp_out" in kinds:
                self._hook_fwd(get_module(block, a.block.mlp_write), self._site_output(Site("mlp_out", layer)))
            if "resid_post" in kinds:
                self._hook_fwd(block, self._site_output(Site("resid_post", layer)))
        if Site("final.scale") in wanted:
            self._hook_pre(m.final_norm, self._final_scale)
        if Site("logits") in wanted:  # the model's output, so after any final soft-cap (Gemma 2)
            self._hook_fwd(m.hf, self._site_output(Site("logits")))

    def _explicit_mixers(self, layers) -> None:
        """Run the state-space mixer of ``layers`` through lmscope's explicit path (see :mod:`lmscope.models.ssm`)."""
        for layer in sorted(layers):
            mixer = get_module(self.model.block(layer), self.model.adapter.block.mixer.module)
            if "forward" in mixer.__dict__:
                raise RuntimeError("Another lmscope hook session is active on this model; nest runs instead.")
            make = explicit_mixer2 if self.model.adapter.block.mixer.scan == "mamba2" else explicit_mixer
            mixer.forward = make(self, layer, mixer)
            self._mixers.append(mixer)

    def _hook_pre(self, module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def _hook_fwd(self, module, fn) -> None:
        self._handles.append(module.register_forward_hook(fn))

    # ------------------------------------------------------------------ hook bodies
    def _expand_pre(self, layer: int):
        ex = self.expand
        b = ex.b

        def rep(v, n):
            if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == b:
                return v.repeat(n, *[1] * (v.ndim - 1))
            if isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v):
                return tuple(rep(t, n) for t in v)
            return v

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = ex.spawns.get(layer)
            if new:
                if ex.keep_base:
                    hidden = torch.cat([hidden, hidden[:b].repeat(new, 1, 1)])
                else:
                    hidden = hidden.repeat(new, 1, 1)
            n = hidden.shape[0] // b
            kwargs = {k: rep(v, n) for k, v in kwargs.items() if k != "hidden_states"}
            if args:
                return (hidden, *(rep(v, n) for v in args[1:])), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _block_pre(self, layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if layer == 0 and self.wants(Site("embed")):
                x = self.process(Site("embed"), x)
            x = self.process(Site("resid_pre", layer), x)
            self._stash[(layer, "resid_pre")] = x
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._mask = None if mask is None else mask.detach()

    def _embedding_norm(self, module, args, output):
        """The embeddings' norm inside block 0 (RWKV's pre_ln): its output is ``embed`` and ``blocks.0.resid_pre``."""
        x = self.process(Site("embed"), output) if self.wants(Site("embed")) else output
        x = self.process(Site("resid_pre", 0), x)
        self._stash[(0, "resid_pre")] = x
        return x

    def _attention(self, layer: int, explicit: bool = True):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        def fn(module, query, key, value, mask, scaling, softcap=None):
            pre = self.prefix
            if pre is not None and self.capture_kv:
                pre.keys[layer], pre.values[layer] = key.detach(), value.detach()
                pre.masks[layer] = None if mask is None else mask.detach()
            elif pre is not None and pre.start > 0:
                k0, v0 = pre.kv(layer, key.shape[0])
                key, value = torch.cat([k0.to(key), key], dim=2), torch.cat([v0.to(value), value], dim=2)
                mask = pre.mask(layer, query.shape[0], query.dtype)
            if explicit:
                return explicit_attention(self, layer, query, key, value, mask, scaling, softcap)
            if softcap is None:
                return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)
            return _explicit(query, key, value, mask, scaling, softcap)

        return fn

    def _o_proj_pre(self, layer: int):
        spec = self.model.spec

        def hook(module, args, kwargs):
            x = args[0]
            z = x.view(*x.shape[:-1], spec.n_heads, spec.d_head)
            z = self.process(Site("attn.z", layer), z)
            self._stash[(layer, "z")] = z
            return (z.reshape(x.shape), *args[1:]), kwargs

        return hook

    def _attn_write(self, layer: int):
        spec = self.model.spec

        def hook(module, args, output):
            write = output[0] if isinstance(output, tuple) else output
            head_site = Site("attn.head_out", layer)
            if self.wants(head_site):
                factor = None
                if spec.post_norms:
                    factor = norm_scale(args[0], spec.norm, self.model.norm_eps_of(module))
                    factor = (factor * norm_gain(module, spec.norm)).to(write.dtype)
                    self._stash_store(layer, "attn_write_factor", factor)
                heads = self.model.head_writes(layer, self._stash[(layer, "z")], factor)
                new_heads = self.process(head_site, heads)
                if head_site in self.ivs:
                    write = write + (new_heads - heads).sum(dim=2)
            write = self.process(Site("attn_out", layer), write)
            mid = Site("resid_mid", layer)
            if self.wants(mid):
                pre = self._stash[(layer, "resid_pre")]
                new_mid = self.process(mid, pre + write)
                if mid in self.ivs:
                    write = new_mid - pre
            return (write, *output[1:]) if isinstance(output, tuple) else write

        return hook

    def _stash_store(self, layer: int, key: str, value: torch.Tensor) -> None:
        """Auxiliary values the decompositions need (frozen post-norm factors), under ``aux.`` names."""
        self.cache[f"aux.blocks.{layer}.{key}"] = value if self.grad else value.detach()

    def _mlp_write_scale(self, layer: int):
        kind = self.model.spec.norm

        def hook(module, args, output):
            factor = norm_scale(args[0], kind, self.model.norm_eps_of(module))
            self._stash_store(layer, "mlp_write_factor", (factor * norm_gain(module, kind)).to(output.dtype))

        return hook

    def _mlp_gate(self, layer: int):
        def hook(module, args, output):  # the gate σ(g) multiplies the down projection's output (RWKV)
            self._stash_store(layer, "mlp_write_factor", torch.sigmoid(output))

        return hook

    def _mlp_down_pre(self, layer: int):
        def hook(module, args, kwargs):
            return (self.process(Site("mlp.post", layer), args[0]), *args[1:]), kwargs

        return hook

    def _site_output(self, site: Site):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self.process(site, output[0]), *output[1:])
            if hasattr(output, "logits") and site.kind == "logits":
                output.logits = self.process(site, output.logits)
                return output
            return self.process(site, output)

        return hook

    def _final_scale(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self._store("final.scale", norm_scale(x, self.model.spec.norm, self.model.norm_eps_of(module)))
