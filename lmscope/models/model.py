"""``Model``: a thin wrapper over a native Hugging Face causal LM and its tokenizer.

It never re-implements the forward pass. It adds a small ``spec``, weight views in a common
layout (per head and per neuron), tokenisation helpers that check single-token targets, scoped
hook sessions, and runs: one forward with sites cached and interventions applied
(:meth:`Model.run`), or many intervention sets on copies of a batch in chunked, batched forwards
(:meth:`Model.run_sets`). The data types of a run live in :mod:`.batch`, the reading of weights in
:mod:`.weights`, the read-outs in :mod:`.readout`, generation in :mod:`.generation`.

Shapes: B prompts, T tokens, H heads of width dh, D residual width, F neurons, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lmscope.errors import InputError, TokenError
from lmscope.interventions import Intervention
from lmscope.models import attention as _attention  # noqa: F401  (registers the attention function)
from lmscope.models import generation as _generation, memo as _memo, memory as _memory, readout as _readout
from lmscope.models import wkv as _wkv
from lmscope.models.batch import Batch, ModelSpec, RunOutput, StepInterventions, select_logits  # noqa: F401 (re-exported)
from lmscope.models.families import adapter_for
from lmscope.models.hooks import HookSession
from lmscope.models.mixing import run_until as _run_until
from lmscope.models.norms import norm_eps
from lmscope.models.parts import Adapter, get_module, linear_weight, require_kinds, site_kinds
from lmscope.models.reuse import Expansion, first_position, plan_chunks, shift
from lmscope.models.weights import make_spec, per_head, per_head_bias, qkv
from lmscope.sites import Site, parse_site


class Model:
    """A loaded causal LM. Build with :func:`lmscope.load`; ``check=True`` validates it at load."""

    def __init__(self, hf, tokenizer, name: str, *, check: bool = True):
        self.hf = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.adapter: Adapter = adapter_for(hf.config)
        if self.adapter.block.mixer.part == "wkv":
            _wkv.prepare(self.hf)  # RWKV: no in-place rescaling of the weights, the true residual stream
        if self.adapter.block.mixer.part != "wkv":  # RWKV has no attention interface to set
            self.hf.set_attn_implementation(_attention.ATTN_IMPL)
        self.spec = make_spec(self)
        self.load_check = "skipped"  # "checked", or "cached" when a pass with this fingerprint is recorded
        if check:
            from lmscope.models.checks import check_at_load

            self.load_check = check_at_load(self)

    # ------------------------------------------------------------------ parts and site kinds
    @property
    def parts(self) -> frozenset[str]:
        """The adapter parts this model has ("embedding", "block", "attention", "mlp", ...)."""
        return self.adapter.parts

    @property
    def site_kinds(self) -> tuple[str, ...]:
        """The site kinds this model has, in :data:`lmscope.sites.KINDS` order."""
        return site_kinds(self.adapter, self.spec.parallel)

    @property
    def mixer_write_kind(self) -> str:
        """The site kind of each block's mixer write: ``attn_out``, ``ssm_out`` (Mamba) or ``wkv_out`` (RWKV)."""
        return self.adapter.block.mixer.write_kind

    def require(self, kinds: Iterable[str | Site], method: str | None = None) -> None:
        """Raise unless the model has every site kind in ``kinds`` (kinds or site names).

        ``method`` names the caller in the message ("DLA by neuron needs mlp.post, which needs the mlp
        part; tiny has no mlp ..."). A missing part raises :class:`UnsupportedArchitectureError`;
        ``resid_mid`` on a parallel-block model raises :class:`SiteError`.
        """
        require_kinds(self.adapter, self.spec.parallel, self.name, kinds, method)

    # ------------------------------------------------------------------ modules and weights
    def _blocks(self):
        return get_module(self.hf, self.adapter.layers)

    def block(self, layer: int):
        return self._blocks()[layer]

    @property
    def final_norm(self):
        return get_module(self.hf, self.adapter.final.norm)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def norm_eps_of(self, module) -> float:
        return norm_eps(module)

    @property
    def W_E(self) -> torch.Tensor:
        """(V, D) token embedding (Gemma's sqrt(D) scaling is applied in its forward, not here)."""
        return get_module(self.hf, self.adapter.embedding.tokens).weight

    @property
    def W_U(self) -> torch.Tensor:
        """(D, V) unembedding."""
        return get_module(self.hf, self.adapter.final.unembed).weight.T

    @property
    def b_U(self) -> torch.Tensor | None:
        return getattr(get_module(self.hf, self.adapter.final.unembed), "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        """The final soft-cap c (the model's logits are ``c·tanh(z / c)`` of the unembedding's output z), or None."""
        return self.spec.softcap

    def attn_scaling(self, layer: int) -> float:
        """The factor that multiplies q·k in ``layer`` (1/sqrt(dh) unless the model sets its own)."""
        scaling = getattr(get_module(self.block(layer), self.adapter.block.mixer.module), "scaling", None)  # HF modules keep it here
        return float(scaling) if scaling is not None else self.spec.d_head ** -0.5

    def attention_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores (B, H, Tq, Tk) of ``attn.q`` (B, Tq, H, dh) and ``attn.k`` (B, Tk, H, dh) in
        ``layer``: q·k times the layer's scaling, soft-capped where the model caps them (Gemma 2); float32, no mask."""
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * self.attn_scaling(layer)
        cap = self.spec.attn_softcap
        return scores if cap is None else torch.tanh(scores / cap) * cap

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the model's final soft-cap to pre-soft-cap logits (..., V); the identity where there is none."""
        c = self.logit_softcap
        return logits if c is None else torch.tanh(logits / c) * c

    def unembed(self, resid: torch.Tensor, *, scale=None, softcap: bool | None = None,
                grad: bool = False) -> torch.Tensor:
        """Logits (..., V) of final residuals (..., D): live final norm, unembedding, soft-cap; with ``scale``
        (1/s) the linear read-out under the frozen final norm. See :func:`lmscope.models.readout.unembed`."""
        return _readout.unembed(self, resid, scale, softcap, grad)

    def logit_direction(self, target: str | int, foil: str | int | None = None, *, scale=1.0
                        ) -> _readout.LogitDirection:
        """``logit(target) [− logit(foil)] = x · vector + constant``, the final norm's scale frozen at ``scale``."""
        return _readout.logit_direction(self, target, foil, scale)

    def norm(self, name: str, x: torch.Tensor, *, scale=None) -> torch.Tensor:
        """The norm ``name`` (``ln_final``, ``blocks.{l}.ln1``, ...) on x (..., D), live or frozen at ``scale``."""
        return _readout.norm(self, name, x, scale)

    def norm_weight(self, name: str) -> torch.Tensor:
        """The stored weight (D,) of the norm ``name`` (Gemma's gain is 1 + this weight)."""
        return _readout.norm_module(self, name).weight

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., D) as the embedding module outputs them (Gemma's √D in), on the model's device;
        where block 0 normalises the embeddings first (RWKV's pre_ln), after that norm, as ``embed`` holds them."""
        with torch.no_grad():
            x = get_module(self.hf, self.adapter.embedding.tokens)(ids.to(self.device))
            norm = self.adapter.embedding.norm
            return x if norm is None else get_module(self.block(0), norm)(x)

    def W_O(self, layer: int) -> torch.Tensor:
        """(H, dh, D) per-head output projection."""
        self.require(["attn.z"], "W_O (per-head output projection)")
        w = linear_weight(get_module(self.block(layer), self.adapter.block.mixer.o_proj), self.adapter.linear)
        return w.reshape(self.spec.n_heads, self.spec.d_head, self.spec.d_model)

    def ssm_out_proj(self, layer: int):
        """The output projection of a state-space block (E -> D), as a callable module (for the load check);
        ROME edits it as the memory kind ``"ssm"`` (:meth:`memory`)."""
        self.require(["ssm_out"], "ssm_out_proj")
        return get_module(self.block(layer), self.adapter.block.mixer.out_proj)

    def b_O(self, layer: int) -> torch.Tensor | None:
        return getattr(get_module(self.block(layer), self.adapter.block.mixer.o_proj), "bias", None)

    def W_Q(self, layer: int) -> torch.Tensor:
        """(H, D, dh) query weights (before RoPE and any q-norm)."""
        return per_head(self.spec, qkv(self, layer, 0)[0])

    def W_K(self, layer: int) -> torch.Tensor:
        """(H, D, dh) key weights, KV heads expanded to query heads."""
        return per_head(self.spec, qkv(self, layer, 1)[0])

    def W_V(self, layer: int) -> torch.Tensor:
        """(H, D, dh) value weights, KV heads expanded to query heads."""
        return per_head(self.spec, qkv(self, layer, 2)[0])

    def b_Q(self, layer: int) -> torch.Tensor | None:
        """(H, dh) query bias or None."""
        return per_head_bias(self, layer, 0)

    def b_K(self, layer: int) -> torch.Tensor | None:
        return per_head_bias(self, layer, 1)

    def b_V(self, layer: int) -> torch.Tensor | None:
        return per_head_bias(self, layer, 2)

    def W_out(self, layer: int) -> torch.Tensor:
        """(F, D) neuron output directions (rows of the down projection)."""
        self.require(["mlp.post"], "W_out (neuron output directions)")
        return linear_weight(get_module(self.block(layer), self.adapter.block.mlp.down), self.adapter.linear)

    def b_out(self, layer: int) -> torch.Tensor | None:
        self.require(["mlp.post"], "b_out (the MLP output bias)")
        return getattr(get_module(self.block(layer), self.adapter.block.mlp.down), "bias", None)

    def head_writes(self, layer: int, z: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
        """Each head's write (B, T, H, D) from z (B, T, H, dh); ``factor`` (B, T, D) is a frozen post-norm."""
        out = torch.einsum("bthd,hde->bthe", z, self.W_O(layer).to(z.dtype))
        return out if factor is None else out * factor.unsqueeze(2)

    # ------------------------------------------------------------------ tokens
    def encode(self, inputs, padding_side: str = "left") -> Batch:
        """Tokenise a prompt, a list of prompts, a (B, T) id tensor, or pass a Batch through."""
        if isinstance(inputs, Batch):
            return inputs
        if isinstance(inputs, torch.Tensor):
            ids = inputs.unsqueeze(0) if inputs.ndim == 1 else inputs
            ids = self._checked_ids(ids)
            mask = torch.ones_like(ids)
        else:
            prompts = [inputs] if isinstance(inputs, str) else list(inputs)
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise InputError("Empty prompt: give at least one non-empty text.")
            self.tokenizer.padding_side = padding_side
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        if ids.shape[1] > self.spec.n_ctx:
            raise InputError(
                f"The prompt has {ids.shape[1]} tokens but {self.name} takes at most {self.spec.n_ctx}; "
                "shorten it."
            )
        if ids.shape[1] == 0:
            raise InputError("Empty prompt: it tokenises to no tokens.")
        pos = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        str_tokens = [
            [t for t, keep in zip(self.tokenizer.convert_ids_to_tokens(row.tolist()), m.tolist()) if keep]
            for row, m in zip(ids, mask)
        ]
        return Batch(ids, mask, pos, [[self._pretty(t) for t in row] for row in str_tokens], padding_side)

    def _checked_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) as a LongTensor; an error unless they are integers inside the embedding table."""
        if ids.ndim != 2 or ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise InputError(f"Token ids must be an integer tensor of shape (T,) or (B, T); got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}. Pass model.encode(text).input_ids or a LongTensor.")
        n = self.W_E.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise TokenError(f"Token id {bad} is outside the vocabulary of {self.name} (0..{n - 1}); pass ids from "
                             "this model's tokenizer.")
        return ids.long()

    def _pretty(self, token: str) -> str:
        return self.tokenizer.convert_tokens_to_string([token]) if token else token

    def to_str_tokens(self, text: str) -> list[str]:
        return self.encode(text).str_tokens[0]

    def token_id(self, token: str | int) -> int:
        """The id of a single token such as ``" Paris"``; a clear error if it splits."""
        if isinstance(token, int):
            if not 0 <= token < self.spec.d_vocab:
                raise TokenError(f"Token id {token} is outside the vocabulary (0..{self.spec.d_vocab - 1}).")
            return token
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [self._pretty(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
            raise TokenError(
                f"{token!r} is not a single token for {self.name}: it splits into {len(ids)} tokens "
                f"{pieces}. Use one of those pieces (mind the leading space) or another word."
            )
        return ids[0]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ running
    def hooks(self, cache: Iterable[str | Site] = (), interventions: Iterable[Intervention] = (),
              grad: bool = False) -> HookSession:
        """A scoped hook session applying ``interventions`` to every row; use as a context manager."""
        return HookSession(self, cache, [(None, iv) for iv in interventions], grad=grad)

    def forward(self, batch: Batch, **kwargs):
        dev = self.device
        return self.hf(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                       position_ids=batch.position_ids.to(dev), use_cache=False, **kwargs)

    def run(self, inputs, *, cache: Iterable[str | Site] = (), interventions: Sequence[Intervention] = (),
            grad: bool = False, logits: str = "all", padding_side: str = "left") -> RunOutput:
        """One forward with ``cache`` sites recorded and ``interventions`` applied.

        ``logits``: "all" keeps (B, T, V), "last" keeps each row's last real token (B, V), "none".
        Inside an active :class:`~lmscope.models.memo.RunMemo`, a plain run of one prompt may come from a
        stored forward (the same values).
        """
        memo = _memo.active(self)
        if memo is not None and isinstance(inputs, str) and not interventions and not grad:
            return memo.run(inputs, cache, logits, padding_side)
        return self.run_plain(inputs, cache=cache, interventions=interventions, grad=grad, logits=logits,
                              padding_side=padding_side)

    def derived(self, run: RunOutput, key, compute):
        """``compute()``, a value of the forward ``run`` alone (``key`` names it and its settings): kept with
        the forward when ``run`` came from an active :class:`~lmscope.models.memo.RunMemo` (the next call reads
        it back), computed otherwise. See :func:`lmscope.models.memo.derived`."""
        return _memo.derived(run, key, compute)

    def run_plain(self, inputs, *, cache: Iterable[str | Site] = (), interventions: Sequence[Intervention] = (),
                  grad: bool = False, logits: str = "all", padding_side: str = "left") -> RunOutput:
        """:meth:`run` with a forward of its own (never from a memo)."""
        batch = self.encode(inputs, padding_side)
        with self.hooks(cache, interventions, grad) as session, torch.set_grad_enabled(grad):
            out = self.forward(batch)
        return RunOutput(batch, select_logits(out.logits, batch, logits), session.cache)

    def run_sets(self, inputs, sets: Sequence[Sequence[Intervention]], *,
                 cache: Iterable[str | Site] = (), logits: str = "last", chunk_size: int | None = None,
                 padding_side: str = "left", progress: bool = False, reuse: bool = True) -> RunOutput:
        """Apply each of N intervention sets to its own copy of the batch, in batched forwards.

        Returns logits and cache entries with a leading set axis: (N, B, ...), equal to N separate
        :meth:`run` calls. Sets are grouped by the lowest layer they touch, and the blocks below
        it run once per chunk instead of once per set. ``chunk_size`` is the most sets per forward
        (default: as many as fit about 16k tokens; :func:`~lmscope.models.reuse.plan_chunks` picks
        the split).

        With ``reuse=True`` (default), ``logits`` "last" or "none", left padding and no ``cache``,
        two more savings apply (see :mod:`lmscope.models.reuse`): sets join a chunk's batch at
        their own lowest layer (not the chunk's), and sets whose interventions all sit at positions
        ≥ p are computed on positions p..T−1 only, with the keys/values of earlier positions taken
        from one unpatched run. Sets with different first positions may share a forward, which
        then starts at the smallest of them.
        """
        batch = self.encode(inputs, padding_side)
        n, b, t = len(sets), *batch.input_ids.shape
        if n == 0:
            raise InputError("run_sets needs at least one intervention set.")
        cache = [parse_site(s, self.spec.n_layers) for s in cache]
        lowest = [min([self._lowest_layer(iv) for iv in ivs], default=self.spec.n_layers) for ivs in sets]
        keep = 1 if logits == "last" and padding_side == "left" and Site("logits") not in cache else 0
        reuse = reuse and not cache and logits in ("last", "none") and batch.padding_side == "left" \
            and "attention" in self.parts  # prefix reuse carries keys/values; a state-space model has a state
        if reuse:
            start = [min([first_position(iv, t) for iv in ivs], default=t - 1) for ivs in sets]
            start = [min(p, t - 1) for p in start]
        else:
            start = [0] * n
        n_layers = self.spec.n_layers
        weights = [(n_layers - min(low, n_layers - 1)) / n_layers for low in lowest]
        # rows of a chunk are laid out by the layer where each set joins (see Expansion)
        chunks = [sorted(idx, key=lambda j: lowest[j]) for idx in plan_chunks(start, weights, b, t, cap=chunk_size)]
        prefix = None
        if any(start):
            with HookSession(self, capture_kv=True) as cap, torch.no_grad():
                self.forward(batch, logits_to_keep=1)
            prefix = cap.prefix
            prefix.attention_mask = batch.attention_mask.to(self.device)
        logit_parts, cache_parts = [], []
        for idx in tqdm(chunks, desc="batched forwards", disable=not progress or len(chunks) < 2):
            p = min(start[j] for j in idx)
            sub = batch if p == 0 else Batch(batch.input_ids[:, p:], batch.attention_mask[:, p:],
                                             batch.position_ids[:, p:], batch.str_tokens, batch.padding_side)
            first = min(min(lowest[j] for j in idx), self.spec.n_layers - 1)
            spawns: dict[int, int] = {}
            for j in idx:
                layer = min(lowest[j], self.spec.n_layers - 1) if reuse else first
                spawns[layer] = spawns.get(layer, 0) + 1
            expand = None
            if len(idx) > 1 or len(spawns) > 1:
                expand = Expansion(b, spawns, keep_base=len(spawns) > 1)
            off = expand.offset if expand is not None else 0
            rows = [(slice(off + k * b, off + (k + 1) * b), shift(iv, p, t)) for k, j in enumerate(idx)
                    for iv in sets[j]]
            pre = prefix.at(p) if p > 0 else None
            with HookSession(self, cache, rows, expand=expand, prefix=pre) as session, torch.no_grad():
                out = self.forward(sub, logits_to_keep=keep)
            big = batch.repeat(len(idx))
            if logits != "none":
                lg = out.logits[off:]
                logit_parts.append(select_logits(lg, big, logits) if not keep else lg[:, -1])
            cache_parts.append({k: v.repeat(len(idx), *[1] * (v.ndim - 1)) if v.shape[0] == b and len(idx) > 1
                                else v for k, v in session.cache.items()})
        order = [j for idx in chunks for j in idx]
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(n)

        def stack(parts):
            return torch.cat(parts).reshape(n, b, *parts[0].shape[1:])[inverse]

        stacked = {k: stack([c[k] for c in cache_parts]) for k in cache_parts[0]}
        lg = None if logits == "none" else stack(logit_parts)
        return RunOutput(batch, lg, stacked)

    def generate(self, inputs, max_new_tokens: int, interventions: StepInterventions | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with per-step ``interventions``: new ids (B, n), log-probs (B, n, V) (see generation)."""
        return _generation.generate(self, inputs, max_new_tokens, interventions)

    def sample(self, inputs, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
        """Prompt + continuation ids (B, P + G) from the native ``generate`` (sampling, beams; stops at EOS)."""
        return _generation.sample(self, inputs, max_new_tokens, generate_kwargs)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a native generation (the generation config's), possibly none."""
        return _generation.eos_token_ids(self)

    def run_until(self, inputs, site: str | Site, padding_side: str = "left") -> torch.Tensor:
        """One site's activations from a forward that stops once the site is known (the blocks above skip)."""
        return _run_until(self, self.encode(inputs, padding_side), site)

    def memory(self, layer: int, kind: str | None = None) -> _memory.Memory:
        """The memory matrix ``W`` (v = W k) of ``layer`` that editing rewrites (default: the MLP down projection,
        or a state-space block's ``out_proj``; see :data:`lmscope.models.memory.MEMORY_KINDS`)."""
        return _memory.Memory(self, layer, kind)

    def edit(self, edit) -> _memory.EditHandle:
        """Apply an edit's weight deltas now; the handle's ``undo()`` (or leaving ``with``) restores them exactly."""
        return _memory.EditHandle(self, _memory.edit_deltas(edit))

    def _lowest_layer(self, iv: Intervention) -> int:
        site = parse_site(iv.site, self.spec.n_layers)
        if site.kind == "embed":
            return 0
        return self.spec.n_layers if site.layer is None else site.layer
