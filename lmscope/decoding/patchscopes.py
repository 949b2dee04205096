"""Patchscopes (Ghandeharioun, Caciularu, Pearce, Dixon, Geva; ICML 2024): let the model read its own states.

Take the hidden state h at (source prompt S, layer ℓ, position i), run a *target* prompt T and
replace its hidden state at (layer ℓ*, position i*) with h, then read the next-token distribution
(or generate a few tokens greedily; the patch is applied on the first forward, and generated tokens
see it through the KV cache). "Layer ℓ" means the input of block ℓ (``resid_pre``; layer 0 is the
token embedding) on both sides, so source and target use the same convention; ``site="resid_post"``
uses block outputs instead.

Target prompts: ``identity`` (few-shot "cat -> cat; 1135 -> 1135; hello -> hello; table -> table;
green -> green; ? ->", patched at "?", ℓ* = ℓ: decodes which token h stands for; with only the first
three demonstrations SmolLM2 copies 81% of random words at layer 0, with five 98%), ``entity`` (a few
"entity: description" pairs, patched at the final "x", then generate) and ``capital`` (few-shot
"country: capital" pairs, patched at the final "x": attribute extraction). Any prompt with a
placeholder token works (:class:`TargetPrompt`). :func:`patchscope_sweep` runs all (ℓ, ℓ*) pairs of one
source in batched forwards; :func:`patchscope_accuracy` measures over many sources how often the
Patchscope yields each one's expected answer (next token, or a text in a greedy continuation), at
ℓ* = ℓ or over a source × target layer grid; :func:`token_identity` is its identity-prompt case.
:mod:`lmscope.decoding.patchscope_eval` holds ready tasks (identity, capitals, descriptions).

Shapes: source states (L, B, D); sweep values (source_layer, target_layer); identity accuracy (layer,).
"""

from __future__ import annotations

import re

from lmscope import specs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmscope.decoding.probes import resolve_layers
from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count

SITES = ("resid_pre", "resid_post", "resid_mid")


@dataclass(frozen=True)
class TargetPrompt:
    """A target prompt and the placeholder token whose state is replaced (its last occurrence)."""

    text: str
    placeholder: str = "?"


TARGET_PROMPTS = {
    "identity": TargetPrompt("cat -> cat; 1135 -> 1135; hello -> hello; table -> table; green -> green; ? ->", "?"),
    "entity": TargetPrompt("Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South "
                           "Korean multinational major appliance and consumer electronics corporation, x", "x"),
    "capital": TargetPrompt("Italy: Rome; Egypt: Cairo; Peru: Lima; Kenya: Nairobi; x:", "x"),
}


def target_prompt(target: str | TargetPrompt) -> TargetPrompt:
    """A :class:`TargetPrompt` from a built-in name, a prompt text (placeholder "?" or "x") or itself."""
    if isinstance(target, TargetPrompt):
        return target
    if target in TARGET_PROMPTS:
        return TARGET_PROMPTS[target]
    if not isinstance(target, str) or not target.strip():
        raise InputError("The target prompt is empty; give a text or one of " + ", ".join(TARGET_PROMPTS) + ".")
    return TargetPrompt(target, "x" if " x" in target and "?" not in target else "?")


def placeholder_position(model: Model, target: TargetPrompt, position: int | None = None) -> tuple[int, list[str]]:
    """The index i* to patch in the tokenised target prompt, and its tokens."""
    tokens = model.encode(target.text).str_tokens[0]
    if position is not None:
        if not -len(tokens) <= position < len(tokens):
            raise InputError(f"Target position {position} is out of range: the target prompt has {len(tokens)} "
                             "tokens.")
        return position % len(tokens), tokens
    hits = [i for i, t in enumerate(tokens) if t.strip() == target.placeholder]
    if not hits:
        raise InputError(f"The target prompt {target.text!r} has no token {target.placeholder!r} to patch "
                         f"(tokens: {tokens}); put the placeholder in it or give the target position.")
    return hits[-1], tokens


def _check_site(site: str) -> None:
    if site not in SITES:
        raise InputError(f"Patchscopes patch the residual stream; site must be one of {SITES}, not {site!r}.")


def source_states(model: Model, sources: str | Sequence[str], layers: Sequence[int], *, position: int = -1,
                  site: str = "resid_pre") -> torch.Tensor:
    """Hidden states (L, B, D) of each source prompt at ``position`` (counted within each prompt)."""
    _check_site(site)
    sources = [sources] if isinstance(sources, str) else list(sources)
    batch = model.encode(sources, padding_side="left")
    t = batch.input_ids.shape[1]
    idx = []
    for r, n in enumerate(batch.lengths.tolist()):
        if not -n <= position < n:
            raise InputError(f"Source position {position} is out of range for source {r} ({n} tokens).")
        idx.append(t - n + position % n)
    names = [f"blocks.{l}.{site}" for l in layers]
    run = model.run(batch, cache=names, logits="none")
    rows = torch.arange(len(sources))
    return torch.stack([run[name][rows, torch.tensor(idx)] for name in names])


def patchscope(model: Model, source: str, layer: int, *, position: int = -1,
               target: str | TargetPrompt = "identity", target_layer: int | None = None,
               target_position: int | None = None, k: int = 10, max_new_tokens: int = 0,
               site: str = "resid_pre") -> Result:
    """One Patchscope: top-k next tokens of the patched target prompt (and a greedy continuation).

    values (k,) probabilities; meta ``top_tokens``, ``generated`` (when ``max_new_tokens`` > 0), the
    source and target tokens and positions.
    """
    k = resolve_count(k, model.spec.d_vocab, "top tokens")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens}: give 0 (no continuation) or more.")
    (layer,) = resolve_layers(model, [layer])
    (tl,) = resolve_layers(model, [layer if target_layer is None else target_layer])
    tp = target_prompt(target)
    tpos, ttokens = placeholder_position(model, tp, target_position)
    h = source_states(model, source, [layer], position=position, site=site)[0]  # (1, D)
    patch = Patch(f"blocks.{tl}.{site}", value=h[:, None, :], positions=[tpos])
    batch = model.encode(tp.text)
    calls = []

    def first_only(abs_pos, real):
        calls.append(1)
        return [patch] if len(calls) == 1 else []

    tokens, logps = model.generate(batch, max(1, max_new_tokens), first_only)
    probs = logps[0, 0].exp()
    top = probs.topk(k)
    src_tokens = model.encode(source).str_tokens[0]
    meta = {"top_tokens": [model.decode([i]) for i in top.indices.tolist()], "top_ids": top.indices.tolist(),
            "source_tokens": src_tokens, "source_position": position % len(src_tokens),
            "target_prompt": tp.text, "target_tokens": ttokens, "target_position": tpos}
    if max_new_tokens > 0:
        meta["generated"] = model.decode(tokens[0].tolist())
    return Result(top.values, (Axis("rank", tuple(str(r + 1) for r in range(k))),), "patchscope", model.name,
                  {"source": source, "position": position}, {"layer": layer, "target_layer": tl, "site": site,
                                                           "k": k, "max_new_tokens": max_new_tokens}, {}, meta)


def patchscope_sweep(model: Model, source: str, *, position: int = -1, layers: Sequence[int] | None = None,
                     target_layers: Sequence[int] | None = None, target: str | TargetPrompt = "identity",
                     target_position: int | None = None, expected: str | int | None = None,
                     site: str = "resid_pre", chunk_size: int | None = None) -> Result:
    """All (source layer, target layer) Patchscopes in batched forwards.

    values (source_layer, target_layer): the probability of ``expected`` (default: the source token
    itself), with extras ``rank`` of it and meta ``top_tokens`` (the top-1 token of every cell).
    """
    layers = resolve_layers(model, layers)
    tls = resolve_layers(model, target_layers)
    tp = target_prompt(target)
    tpos, ttokens = placeholder_position(model, tp, target_position)
    src = model.encode(source)
    if expected is None:
        eid = int(src.input_ids[0, position])
    else:
        eid = model.token_id(expected)
    h = source_states(model, source, layers, position=position, site=site)  # (L, 1, D)
    sets = [[Patch(f"blocks.{tl}.{site}", value=h[i][:, None, :], positions=[tpos])]
            for i in range(len(layers)) for tl in tls]
    logits = model.run_sets(tp.text, sets, logits="last", chunk_size=chunk_size).logits[:, 0].float()
    probs = logits.softmax(-1).reshape(len(layers), len(tls), -1)
    p = probs[..., eid]
    rank = (probs > p[..., None]).sum(-1) + 1
    top1 = probs.argmax(-1)
    meta = {"top_tokens": [[model.decode([i]) for i in row] for row in top1.tolist()],
            "expected": model.decode([eid]), "source_tokens": src.str_tokens[0],
            "target_prompt": tp.text, "target_tokens": ttokens, "target_position": tpos}
    return Result(p, (Axis("source_layer", tuple(map(str, layers))), Axis("target_layer", tuple(map(str, tls)))),
                  "patchscope_sweep", model.name, {"source": source, "expected": model.decode([eid]),
                                                   "expected_id": eid},
                  {"position": position, "site": site}, {"rank": rank}, meta)


def _expected_ids(model: Model, sources: list[str], expected, position: int) -> torch.Tensor:
    if expected is None:
        return torch.tensor([int(model.encode(s).input_ids[0, position]) for s in sources])
    if len(expected) != len(sources):
        raise InputError(f"{len(expected)} expected tokens for {len(sources)} sources.")
    return torch.tensor([model.token_id(e) for e in expected])


def contains_any(text: str, wanted: str | Sequence[str], stop: str | None = None) -> bool:
    """Does ``text`` (cut at the first ``stop``, when given) contain ``wanted``, or one of a list of
    alternatives, as whole words, case-insensitively?"""
    if stop:
        text = text.split(stop)[0]
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    return any(re.search(rf"\b{re.escape(w.strip())}\b", text, flags=re.I) for w in wanted)


def patchscope_accuracy(model: Model, sources: Sequence[str], expected: Sequence | None = None, *,
                        layers: Sequence[int] | None = None, target_layers: Sequence[int] | None = None,
                        position: int = -1, target: str | TargetPrompt = "identity", target_position: int | None = None,
                        site: str = "resid_pre", generate: int = 0, stop: str | None = None,
                        source_model: Model | None = None,
                        mapping: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
                        chunk_size: int | None = None) -> Result:
    """How often a Patchscope reads the expected answer out of each source's hidden state.

    Without ``generate``, a source counts as read when the patched target prompt's top-1 next token is
    its expected token (default: the source's own token at ``position``, the identity Patchscope).
    With ``generate=n``, the target prompt is continued greedily for n tokens and a source counts when
    the continuation (up to the first ``stop``, when given) contains its expected text (a string or a
    list of alternatives: whole words, case-insensitive), as for entity descriptions.
    ``target_position`` overrides the placeholder. ``target_layers=None`` patches ℓ* = ℓ: values
    (layer,); a list of target layers gives values (source_layer, target_layer).
    extras ``correct`` (..., B); in next-token mode also ``expected_prob`` (..., B); in generation mode
    meta ``generated`` (texts per cell).

    Cross-model: the sources run on ``source_model`` (``layers`` are its layers, ``expected`` defaults
    to its tokens) and ``mapping(h (B, D_source), ℓ, ℓ*) -> (B, D_target)`` carries each state into
    ``model`` (see :func:`lmscope.decoding.patchscope_models.fit_affine_maps`); give ``target_layers``.
    """
    sources = list(sources)
    if not sources:
        raise InputError("No source prompts.")
    if generate < 0:
        raise InputError(f"generate={generate}: give 0 (next token) or a number of tokens.")
    if generate and (expected is None or len(expected) != len(sources)):
        raise InputError("With generate > 0 give one expected text (or a list of them) per source.")
    src = model if source_model is None else source_model
    if (source_model is None) != (mapping is None) or (source_model is not None and target_layers is None):
        raise InputError("A cross-model Patchscope needs source_model, mapping and target_layers together.")
    layers = resolve_layers(src, layers)
    tls = None if target_layers is None else resolve_layers(model, target_layers)
    pairs = [(i, l, l) for i, l in enumerate(layers)] if tls is None else \
        [(i, l, t) for i, l in enumerate(layers) for t in tls]
    tp = target_prompt(target)
    tpos, _ = placeholder_position(model, tp, target_position)
    h = source_states(src, sources, layers, position=position, site=site)  # (L, B, D)
    mapped = [h[i] if mapping is None else mapping(h[i], l, t).to(h.dtype) for i, l, t in pairs]
    patches = [[Patch(f"blocks.{t}.{site}", value=v[:, None, :], positions=[tpos])]
               for v, (_, _, t) in zip(mapped, pairs)]
    shape = (len(layers),) if tls is None else (len(layers), len(tls))
    extras, meta = {}, {}
    if generate:
        batch = model.encode([tp.text] * len(sources))
        texts = []
        for ivs in patches:
            calls = []

            def first_only(abs_pos, real, ivs=ivs, calls=calls):
                calls.append(1)
                return ivs if len(calls) == 1 else []

            tokens, _ = model.generate(batch, generate, first_only)
            texts.append([model.decode(row.tolist()) for row in tokens])
        correct = torch.tensor([[contains_any(t, e, stop) for t, e in zip(row, expected)] for row in texts])
        meta["generated"] = texts
        meta["expected"] = [e if isinstance(e, str) else list(e) for e in expected]
    else:
        if expected is None and source_model is not None:  # the source token, as text, in the target's vocabulary
            expected = [src.decode([int(src.encode(s).input_ids[0, position])]) for s in sources]
        eids = _expected_ids(model, sources, expected, position)
        logits = model.run_sets([tp.text] * len(sources), patches, logits="last", chunk_size=chunk_size).logits.float()
        correct = logits.argmax(-1) == eids
        extras["expected_prob"] = logits.softmax(-1).gather(-1, eids.expand(len(pairs), -1)[..., None])[..., 0] \
            .reshape(*shape, -1)
        meta["expected"] = [model.decode([i]) for i in eids.tolist()]
    extras["correct"] = correct.int().reshape(*shape, -1)
    values = correct.float().mean(-1).reshape(shape)
    axes = (Axis("layer", tuple(map(str, layers))),) if tls is None else \
        (Axis("source_layer", tuple(map(str, layers))), Axis("target_layer", tuple(map(str, tls))))
    params = {"site": site, "position": position, "target_prompt": tp.text, "target_position": tpos, "n": len(sources),
              "generate": generate, **({"stop": stop} if stop else {}),
              **({"source_model": src.name} if source_model is not None else {})}
    return Result(values, axes, "patchscope_accuracy", model.name, None, params, extras, meta)


def token_identity(model: Model, sources: Sequence[str], *, layers: Sequence[int] | None = None,
                   position: int = -1, target: str | TargetPrompt = "identity", site: str = "resid_pre",
                   expected: Sequence[str | int] | None = None, chunk_size: int | None = None) -> Result:
    """Share of sources whose identity Patchscope (ℓ* = ℓ) predicts the source token, per layer.

    ``expected`` defaults to each source's token at ``position``. values (layer,) accuracy; extras
    ``correct`` (layer, B) booleans and ``expected_prob`` (layer, B).
    """
    res = patchscope_accuracy(model, sources, expected, layers=layers, position=position, target=target, site=site,
                              chunk_size=chunk_size)
    return Result(res.values, res.axes, "patchscope_token_identity", model.name, None,
                  {k: v for k, v in res.params.items() if k not in ("generate", "target_position")}, res.extras,
                  res.meta)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class PatchscopeConfig:
    """One Patchscope (or with ``sweep`` every source × target layer) of the source prompt's hidden state."""

    layer: int | None = specs.option(None, "Source layer (input of this block; 0 = embeddings); needed unless --sweep.")
    position: int = specs.option(-1, "Source token position (default: last).")
    target_prompt: str = specs.option("identity", "'identity', 'entity' or a prompt holding a placeholder '?' or 'x'.")
    target_layer: int | None = specs.option(None, "Target layer (default: the source layer).")
    target_position: int | None = specs.option(None, "Target position (default: the placeholder).")
    generate: int = specs.option(0, "Also generate this many tokens greedily.", flags=("--generate",))
    sweep: bool = specs.option(False, "Sweep all source layers × target layers instead.", flags=("--sweep",))
    k: int = specs.option(10, "Top tokens to keep.")

    def __post_init__(self):
        if not self.sweep and self.layer is None:
            raise InputError("Give --layer L (the source layer), or --sweep for every layer.")
        if self.k < 1 or self.generate < 0:
            raise InputError("--k must be positive and --generate non-negative.")


def run_patchscope(model: Model, source: specs.Prompt, config: PatchscopeConfig) -> Result:
    """Patchscope: patch a hidden state into a target prompt and decode what it says."""
    if config.sweep:
        return patchscope_sweep(model, source.text, position=config.position, target=config.target_prompt,
                                target_position=config.target_position)
    return patchscope(model, source.text, config.layer, position=config.position, target=config.target_prompt,
                      target_layer=config.target_layer, target_position=config.target_position, k=config.k,
                      max_new_tokens=config.generate)


specs.register(specs.MethodSpec("patchscope", "decoding", "prompt", PatchscopeConfig, run_patchscope,
                                sites=("resid_pre",), cli_inputs=("source",)))
