"""Contrastive activation addition (CAA; Rimsky/Panickssery et al., ACL 2024) on A/B questions.

CAA builds one steering vector per layer from multiple-choice questions whose two answers differ in
a behaviour (:mod:`lmscope.decoding.ab_data`). For each training question, the prompt (the question in
the model's chat template, then ``(``) is completed once with the behaviour-matching answer letter and
once with the other letter; the vector of layer ℓ is the mean over questions of the difference of the
residual stream at the answer-letter token::

    v_ℓ = mean_q [ h_ℓ(prompt_q + matching letter) − h_ℓ(prompt_q + other letter) ]

Steering adds ``m · v_ℓ`` to the same site at every position from the end of the instruction on (the
last token of the chat template's assistant header, then ``(``, then whatever is generated). The paper
sweeps layers and multipliers (about ±1) and measures, on held-out questions, the probability of the
matching letter normalised over {A, B} at the position after ``(``; a behaviour direction raises it
for m > 0 and lowers it for m < 0.

Layer ℓ is the output of block ℓ (``resid_post``, as in the paper's code); ``site="resid_pre"`` uses
block inputs. Models without a chat template get a plain ``question\\n\\nAnswer: (`` prompt, steered
from the ``:`` on. Use it when a behaviour can be posed as A/B questions; :func:`~lmscope.decoding.
steering.generate` with ``from_position`` steers open-ended generation with the same vectors.

Shapes: vectors (L, D); sweep values (layer, multiplier) mean matching probability; per-question
probabilities (layer, multiplier, N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.decoding.ab_data import BUILTIN, LETTERS, ABItem, load_ab, split
from lmscope.decoding.probes import collect, layer_list, resolve_layers
from lmscope.decoding.steering import mean_difference
from lmscope.errors import InputError
from lmscope.interventions import Add
from lmscope.models import Model
from lmscope.results import Axis, Result

SITES = ("resid_post", "resid_pre", "resid_mid")
TEMPLATES = ("auto", "chat", "plain")


@dataclass(frozen=True)
class ABPrompts:
    """A/B prompts for one model: ``prompts`` end with ``(`` (the answer letter comes next), ``matching``
    letters, the token ids of "A" and "B" after ``(``, and ``steered``: how many final positions
    (from the last instruction token on) receive the vector."""

    prompts: list[str]
    matching: list[str]
    letter_ids: tuple[int, int]
    steered: int
    chat: bool

    def completed(self, matching: bool) -> list[str]:
        """Each prompt with its matching (or its other) answer letter appended."""
        return [p + (m if matching else LETTERS[1 - LETTERS.index(m)]) for p, m in zip(self.prompts, self.matching)]


def _ids(model: Model, text: str) -> list[int]:
    return model.tokenizer(text)["input_ids"]


def ab_prompts(model: Model, items: Sequence[ABItem], template: str = "auto") -> ABPrompts:
    """The prompts of ``items`` in the chat template (``template="chat"``, the default where the tokenizer
    has one) or as ``question\\n\\nAnswer: (`` (``"plain"``), checked to tokenise as CAA needs."""
    if template not in TEMPLATES:
        raise InputError(f"template={template!r}: use one of {', '.join(TEMPLATES)}.")
    if not items:
        raise InputError("No A/B items.")
    has_chat = bool(getattr(model.tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise InputError(f"{model.name}'s tokenizer has no chat template; use template='plain'.")
    chat = template == "chat" or (template == "auto" and has_chat)
    prompts, steered = [], set()
    for item in items:
        if chat:
            head = model.tokenizer.apply_chat_template([{"role": "user", "content": item.question}], tokenize=False,
                                                       add_generation_prompt=True)
            prompt = head + "("
        else:
            head = f"{item.question}\n\nAnswer:"
            prompt = head + " ("
        h, p = _ids(model, head), _ids(model, prompt)
        if p[:len(h)] != h:
            raise InputError(f"The answer opening after {head[-30:]!r} merges with the instruction's last token; "
                             "use the other template.")
        steered.add(len(p) - len(h) + 1)  # the instruction's last token and everything after it
        prompts.append(prompt)
    if len(steered) != 1:
        raise InputError(f"The prompts' answer openings tokenise to different lengths {sorted(steered)}.")
    base = _ids(model, prompts[0])
    letter_ids = []
    for letter in LETTERS:
        ids = _ids(model, prompts[0] + letter)
        if ids[:-1] != base:
            raise InputError(f"The answer letter {letter!r} merges with '(' in {model.name}'s tokenizer; CAA reads "
                             "the letter as its own token.")
        letter_ids.append(ids[-1])
    if letter_ids[0] == letter_ids[1]:
        raise InputError(f"'A' and 'B' are the same token ({letter_ids[0]}) for {model.name}'s tokenizer (unknown "
                         "tokens?); CAA needs the two answer letters as distinct tokens.")
    return ABPrompts(prompts, [it.matching for it in items], tuple(letter_ids), steered.pop(), chat)


def caa_vectors(model: Model, prompts: ABPrompts, layers: Sequence[int] | None = None, *, site: str = "resid_post",
                batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """CAA vectors (L, D): mean over prompts of h(matching letter) − h(other letter) at the letter token,
    and the mean residual norm (L,) at that token (to compare the vectors' size with)."""
    if site not in SITES:
        raise InputError(f"CAA reads and steers the residual stream; site must be one of {SITES}, not {site!r}.")
    layers = resolve_layers(model, layers)
    pos, _ = collect(model, prompts.completed(True), site, layers, position="last", batch_size=batch_size)
    neg, _ = collect(model, prompts.completed(False), site, layers, position="last", batch_size=batch_size)
    vectors = torch.stack([mean_difference(pos[l], neg[l]) for l in layers])
    norms = torch.stack([torch.cat([pos[l], neg[l]]).norm(dim=-1).mean() for l in layers])
    return vectors, norms


def matching_probability(model: Model, prompts: ABPrompts, sets: Sequence[Sequence] = ((),), *,
                         chunk_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """P(matching letter) normalised over {A, B} at the end of each prompt, per intervention set: (S, N)."""
    logits = model.run_sets(prompts.prompts, list(sets), logits="last", chunk_size=chunk_size,
                            progress=progress).logits.float()
    ab = logits[..., list(prompts.letter_ids)].softmax(-1)  # (S, N, 2)
    col = torch.tensor([LETTERS.index(m) for m in prompts.matching])
    return ab.gather(-1, col.expand(ab.shape[0], -1)[..., None])[..., 0]


def steering_set(prompts: ABPrompts, vector: torch.Tensor, layer: int, multiplier: float,
                 site: str = "resid_post") -> list:
    """The CAA intervention: ``multiplier · vector`` added at ``site`` of ``layer`` from the instruction's end on."""
    return [Add(f"blocks.{layer}.{site}", vector, scale=multiplier, positions=list(range(-prompts.steered, 0)))]


def caa_sweep(model: Model, items: Sequence[ABItem], *, layers: Sequence[int] | None = None,
              multipliers: Sequence[float] = (-1.0, -0.5, 0.0, 0.5, 1.0), test: float | int = 0.5, seed: int = 0,
              site: str = "resid_post", template: str = "auto", chunk_size: int | None = None,
              progress: bool = False, name: str = "custom") -> Result:
    """Build CAA vectors on a training split and sweep (layer, multiplier) on the held-out questions.

    values (layer, multiplier): mean P(matching letter | A or B) over held-out questions; extras
    ``per_question`` (layer, multiplier, N), ``vectors`` (L, D), ``vector_norm`` and ``resid_norm`` (L,),
    ``shift`` (L,) = value at the largest multiplier − value at the smallest.
    """
    multipliers = [float(m) for m in multipliers]
    if not multipliers or len(set(multipliers)) != len(multipliers):
        raise InputError(f"multipliers {multipliers}: give at least one, without repeats.")
    layers = resolve_layers(model, layers)
    train, held = split(list(items), test, seed)
    if {it.matching for it in train} != set(LETTERS):
        raise InputError("The training split has only one answer letter; the vector would be the letter's, not the "
                         "behaviour's. Give items with both letters matching.")
    train_p, test_p = ab_prompts(model, train, template), ab_prompts(model, held, template)
    vectors, resid_norm = caa_vectors(model, train_p, layers, site=site)
    sets, where = [[]], {}
    for i, l in enumerate(layers):
        for j, m in enumerate(multipliers):
            if m != 0:
                where[i, j] = len(sets)
                sets.append(steering_set(test_p, vectors[i], l, m, site))
    probs = matching_probability(model, test_p, sets, chunk_size=chunk_size, progress=progress)
    per = torch.stack([torch.stack([probs[where.get((i, j), 0)] for j in range(len(multipliers))])
                       for i in range(len(layers))])  # (L, M, N)
    values = per.mean(-1)
    hi, lo = multipliers.index(max(multipliers)), multipliers.index(min(multipliers))
    extras = {"per_question": per, "vectors": vectors, "vector_norm": vectors.norm(dim=-1), "resid_norm": resid_norm,
              "shift": values[:, hi] - values[:, lo]}
    meta = {"behaviour": name, "source": BUILTIN.get(name, name), "n_train": len(train), "n_test": len(held),
            "unsteered": float(probs[0].mean()), "unsteered_matching_rate": float((probs[0] > 0.5).float().mean()),
            "test_matching": [it.matching for it in held], "unsteered_p_A": float(torch.where(
                torch.tensor([it.matching == "A" for it in held]), probs[0], 1 - probs[0]).mean()),
            "chat_template": test_p.chat,
            "steered_positions": test_p.steered, "example_prompt": test_p.prompts[0]}
    params = {"site": site, "test": test, "seed": seed, "template": template}
    axes = (Axis("layer", tuple(map(str, layers))), Axis("multiplier", tuple(f"{x:g}" for x in multipliers)))
    return Result(values, axes, "caa", model.name, {"behaviour": name}, params, extras, meta)


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class CAAConfig:
    """CAA on an A/B behaviour dataset: vectors per layer, held-out matching probability per multiplier."""

    behaviour: str = specs.option("myopic-reward", "Built-in A/B behaviour (" + ", ".join(BUILTIN) + ") or a "
                                  "JSON/JSONL file in the CAA format.")
    layers: str | None = specs.option(None, "Layers to sweep: '0,5,10', '0-10', '0:30:5' (default: all).")
    multipliers: tuple[float, ...] = specs.option((-1.0, -0.5, 0.0, 0.5, 1.0), "Multipliers of the vector "
                                                  "(repeat the option for each).")
    test: float = specs.option(0.5, "Held-out share of the questions (or a count, if ≥ 1).")
    limit: int | None = specs.option(None, "Use at most this many questions (a seeded sample).")
    seed: int = specs.option(0, "Seed of the letter balance, the sample and the split.")
    site: str = specs.option("resid_post", "Residual site read and steered (resid_post = block output, as the paper).",
                             choices=SITES)
    template: str = specs.option("auto", "Prompt format: the chat template (auto: when the tokenizer has one) or "
                                 "plain 'question / Answer: ('.", choices=TEMPLATES)

    def __post_init__(self):
        specs.check_config(self)
        if not self.multipliers:
            raise InputError("--multipliers: give at least one multiplier.")
        if self.test <= 0 or (self.test >= 1 and self.test != int(self.test)):
            raise InputError(f"--test {self.test}: a share in (0, 1) or a whole count.")
        if self.limit is not None and self.limit < 2:
            raise InputError("--limit must be at least 2 (one question to build the vector, one to test).")
        layer_list(self.layers)


def run_caa(model: Model, inputs, config: CAAConfig) -> Result:
    """Contrastive activation addition: A/B-answer steering vectors per layer, swept over multipliers on
    held-out questions (probability of the behaviour-matching letter)."""
    items = load_ab(config.behaviour, seed=config.seed, limit=config.limit)
    test = config.test if config.test < 1 else int(config.test)
    return caa_sweep(model, items, layers=layer_list(config.layers), multipliers=config.multipliers, test=test,
                     seed=config.seed, site=config.site, template=config.template, progress=True,
                     name=config.behaviour)


specs.register(specs.MethodSpec("caa", "decoding", "none", CAAConfig, run_caa, sites=("resid_post",)))
