"""Task prompt generators for patching and circuit work: IOI, induction, factual recall.

Every generator returns a :class:`PromptPairs`: clean prompts (the behaviour is present), corrupted
prompts of the same token length (the behaviour is removed), the target token of each clean prompt
and a foil token (the answer the corruption pushes towards, or the competing answer), plus
per-prompt position metadata. Nothing is downloaded: names, places, objects and the
country → capital table are built in, filtered to single tokens of the model at hand.

Public API (stable; other method families import it)::

    PromptPairs(clean, corrupt, targets, foils, positions=[{role: index}], meta={})
        .check(model) -> PromptPairs         # equal token lengths per pair, single-token answers
        .subset(indices) / len(pairs)
        .token_ids(model) -> (targets (B,), foils (B,)) as LongTensors
    pair(clean, corrupt, target, foil=None) -> PromptPairs   # one hand-written pair
    single_token_names(model, names=NAMES) -> list[str]      # " Mary"-style, one token each
    ioi(model, n=50, *, order="mixed"|"ABBA"|"BABA", corruption="ABC"|"swap_io_s"|"s2_io", seed=0)
    induction(model, n=20, *, seq_len=20, seed=0)            # repeated random tokens
    factual(model, n=None, *, seed=0)                        # "The capital of France is" → " Paris"
    task_pairs(model, "recall", n)   # GeoNames facts the model knows (:mod:`.recall`)

IOI (Wang et al. 2023): "When Mary and John went to the store, John gave a drink to" → " Mary".
The indirect object (IO) appears once, the subject (S) twice (S1, S2). ``order="ABBA"`` puts IO
first ("Mary and John ... John"), ``"BABA"`` puts S first ("John and Mary ... John"). Corruptions:
``"ABC"`` fills the three name slots with three other names (the p_ABC distribution of the paper);
``"swap_io_s"`` swaps IO and S everywhere (the answer flips); ``"s2_io"`` replaces S2 by the IO
(so the duplicated name changes). Positions recorded per prompt: ``IO``, ``S1``, ``S2``, ``S1+1``,
``END`` (the last token). targets = IO, foils = S.

Induction: clean = ``[r_1 .. r_n, r_1 .. r_n]`` for random tokens r; corrupt = ``[s_1 .. s_n,
r_1 .. r_n]`` (first copy replaced by other random tokens, so the second copy cannot be predicted
by induction). Prompts end with the second copy's token r_{n-1}, so the target is r_n (predictable
only by induction) and the foil is s_n. Positions: ``END``, ``FIRST``
(index of r_n's first occurrence), ``PREV`` (first occurrence of the last token).

Factual recall: "The capital of {country} is" → capital; corrupt uses another country of the same
token length (foil = that country's capital). Positions: ``SUBJ_FIRST``, ``SUBJ_LAST``, ``END``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from lmscope import specs
from lmscope.errors import InputError, TokenError

if TYPE_CHECKING:
    from lmscope.models import Model

NAMES = (
    "Mary John Alice Bob James Michael David Sarah Emma Anna Tom Paul Mark Peter Lisa Laura Kate Jack "
    "Daniel Rachel Susan Robert William Richard Thomas Charles Joseph George Edward Henry Jane Helen "
    "Linda Karen Nancy Betty Sandra Amy Anne Ruth Julia Grace Alex Ryan Kevin Brian Eric Adam Steven "
    "Andrew Joshua Matthew Christopher Jennifer Jessica Elizabeth Michelle Emily Sophia Olivia Lucy "
    "Max Sam Ben Dan Tim Jim Joe Will Tony Chris Nick Frank Carl Fred Anthony Victoria Martin Jason "
    "Scott Jeff Gary Larry Dennis Roger Patrick Harry Simon Luke Oliver Jacob Ethan Noah Liam Mia Ella"
).split()

PLACES = ("store garden school park restaurant office hospital station house beach market library "
          "church museum cafe hotel").split()
OBJECTS = ("drink ring book kiss bone basketball computer necklace snack key letter bottle gift ball "
           "pen flower").split()

IOI_TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {C} decided to give it to",
    "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {C} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
    "Then, {A} and {B} had a long argument, and afterwards {C} said to",
)

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("China", "Beijing"), ("Thailand", "Bangkok"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
    ("Argentina", "Buenos"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Cuba", "Havana"), ("Mexico", "Mexico"), ("Chile", "Santiago"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("India", "New"),
    ("England", "London"), ("Scotland", "Edinburgh"), ("Ukraine", "Kyiv"), ("Israel", "Jerusalem"),
    ("Colombia", "Bog"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
)
FACT_TEMPLATE = "The capital of {X} is"


@dataclass
class PromptPairs:
    """Clean/corrupted prompt pairs with the answer tokens and per-prompt positions.

    ``clean[i]`` and ``corrupt[i]`` tokenise to the same length; ``targets[i]`` is the clean answer
    (e.g. " Mary"), ``foils[i]`` the competing one (e.g. " John"; may be None when unknown).
    ``positions[i]`` maps role names (``"IO"``, ``"S1"``, ``"S2"``, ``"END"``, ...) to token indices of
    prompt i (without padding).
    """

    clean: list[str]
    corrupt: list[str]
    targets: list[str]
    foils: list[str | None]
    positions: list[dict[str, int]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.clean)
        if n == 0:
            raise InputError("PromptPairs needs at least one clean prompt.")
        for name in ("corrupt", "targets", "foils"):
            if len(getattr(self, name)) != n:
                raise InputError(f"PromptPairs: {name} has {len(getattr(self, name))} entries but clean has {n}.")
        if self.positions and len(self.positions) != n:
            raise InputError(f"PromptPairs: positions has {len(self.positions)} entries but clean has {n}.")
        if not self.positions:
            self.positions = [{} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, indices: Sequence[int] | slice) -> PromptPairs:
        idx = range(len(self))[indices] if isinstance(indices, slice) else list(indices)
        return PromptPairs([self.clean[i] for i in idx], [self.corrupt[i] for i in idx],
                           [self.targets[i] for i in idx], [self.foils[i] for i in idx],
                           [self.positions[i] for i in idx], dict(self.meta))

    def token_ids(self, model: Model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(targets (B,), foils (B,) or None) as token ids; a TokenError if any answer splits."""
        t = torch.tensor([model.token_id(x) for x in self.targets])
        if any(f is None for f in self.foils):
            return t, None
        return t, torch.tensor([model.token_id(x) for x in self.foils])

    def check(self, model: Model) -> PromptPairs:
        """Raise a clear error if a pair differs in token length (naming the first differing token)
        or an answer is not a single token; return self."""
        for i, (c, r) in enumerate(zip(self.clean, self.corrupt)):
            tc, tr = model.to_str_tokens(c), model.to_str_tokens(r)
            if len(tc) != len(tr):
                first = next((j for j, (a, b) in enumerate(zip(tc, tr)) if a != b), min(len(tc), len(tr)))
                raise InputError(
                    f"Pair {i}: the clean prompt has {len(tc)} tokens and the corrupted one {len(tr)}; they "
                    f"first differ at token {first} ({_tok(tc, first)!r} vs {_tok(tr, first)!r}). Patching needs "
                    "aligned positions: use replacements that are single tokens (mind the leading space)."
                )
        self.token_ids(model)
        return self

    def lengths(self, model: Model) -> list[int]:
        """Token length of each clean prompt."""
        return [len(model.to_str_tokens(c)) for c in self.clean]


def _tok(tokens: list[str], i: int) -> str:
    return tokens[i] if i < len(tokens) else "<end>"


def pair(clean: str, corrupt: str, target: str, foil: str | None = None) -> PromptPairs:
    """A single hand-written pair (what the CLI builds)."""
    return PromptPairs([clean], [corrupt], [target], [foil], [{}], {"task": "custom"})


def single_token_names(model: Model, names: Sequence[str] = NAMES) -> list[str]:
    """The names (with a leading space, as they appear mid-sentence) that are one token for ``model``."""
    return _single_tokens(model, names)


def _single_tokens(model: Model, words: Sequence[str]) -> list[str]:
    keep, unk = [], model.tokenizer.unk_token_id
    for w in words:
        try:
            tid = model.token_id(" " + w)
        except TokenError:
            continue
        if tid != unk:
            keep.append(" " + w)
    return keep


def _ioi_text(template: str, a: str, b: str, c: str, place: str, obj: str) -> str:
    return template.format(A=a.strip(), B=b.strip(), C=c.strip(), PLACE=place.strip(), OBJECT=obj.strip())


def _name_positions(model: Model, text: str, names: Sequence[str]) -> list[int]:
    toks = model.to_str_tokens(text)
    return [i for i, t in enumerate(toks) if t in names]


def ioi(model: Model, n: int = 50, *, order: str = "mixed", corruption: str = "ABC", seed: int = 0,
        templates: Sequence[str] | None = None) -> PromptPairs:
    """``n`` IOI pairs with single-token names, places and objects for ``model``.

    ``order``: "ABBA", "BABA" or "mixed" (alternating). ``corruption``: "ABC", "swap_io_s" or "s2_io"
    (see the module docstring). Only templates that tokenise to the same length as the first usable
    one are kept, so every prompt of the dataset has the same token length and positions align
    across prompts (a layer × position sweep over the dataset is meaningful).
    """
    if order not in ("mixed", "ABBA", "BABA"):
        raise InputError(f"order={order!r}: use 'mixed', 'ABBA' or 'BABA'.")
    if corruption not in ("ABC", "swap_io_s", "s2_io"):
        raise InputError(f"corruption={corruption!r}: use 'ABC', 'swap_io_s' or 's2_io'.")
    if n < 1:
        raise InputError("n must be at least 1.")
    names = single_token_names(model)
    places, objects = _single_tokens(model, PLACES), _single_tokens(model, OBJECTS)
    if len(names) < 5 or not places or not objects:
        raise TokenError(
            f"{model.name} has too few single-token names ({len(names)}), places ({len(places)}) or objects "
            f"({len(objects)}) for IOI; pass a model with a word-level or BPE vocabulary covering common names."
        )
    rng = random.Random(seed)
    usable, length = [], None
    for t in templates or IOI_TEMPLATES:
        ln = len(model.to_str_tokens(_ioi_text(t, names[0], names[1], names[1], places[0], objects[0])))
        length = ln if length is None else length
        if ln == length:
            usable.append(t)
    clean, corrupt, targets, foils, positions = [], [], [], [], []
    for i in range(n):
        template = usable[i % len(usable)]
        io, s, x, y, z = rng.sample(names, 5)
        place, obj = rng.choice(places), rng.choice(objects)
        abba = order == "ABBA" or (order == "mixed" and i % 2 == 0)
        a, b = (io, s) if abba else (s, io)
        c_text = _ioi_text(template, a, b, s, place, obj)
        if corruption == "ABC":
            a2, b2 = (x, y) if abba else (y, x)
            r_text = _ioi_text(template, a2, b2, z, place, obj)
        elif corruption == "swap_io_s":
            a2, b2 = (s, io) if abba else (io, s)
            r_text = _ioi_text(template, a2, b2, io, place, obj)
        else:
            r_text = _ioi_text(template, a, b, io, place, obj)
        toks = model.to_str_tokens(c_text)
        name_pos = [j for j, t in enumerate(toks) if t in (io, s)]
        s_pos = [j for j in name_pos if toks[j] == s]
        io_pos = [j for j in name_pos if toks[j] == io]
        clean.append(c_text)
        corrupt.append(r_text)
        targets.append(io)
        foils.append(s)
        positions.append({"IO": io_pos[0], "S1": s_pos[0], "S2": s_pos[-1], "S1+1": s_pos[0] + 1,
                          "END": len(toks) - 1})
    out = PromptPairs(clean, corrupt, targets, foils, positions,
                      {"task": "ioi", "order": order, "corruption": corruption, "seed": seed,
                       "templates": list(usable)})
    return out.check(model)


def induction(model: Model, n: int = 20, *, seq_len: int = 20, seed: int = 0,
              vocab: Sequence[int] | None = None) -> PromptPairs:
    """Repeated random tokens: clean ``R R[:-1]`` predicts ``R[-1]``; corrupt ``S R[:-1]`` (foil ``S[-1]``).

    Tokens are drawn (seeded) from ``vocab`` (default: ids whose decoded text is a single word that
    re-tokenises to itself, so prompts round-trip through text), all distinct within a sequence.
    Prompts are given as text; every pair has 2 * seq_len - 1 tokens.
    """
    if seq_len < 2:
        raise InputError("seq_len must be at least 2.")
    pool = list(vocab) if vocab is not None else _round_trip_tokens(model)
    if len(pool) < 2 * seq_len:
        raise InputError(f"Only {len(pool)} usable tokens for sequences of {seq_len}; lower seq_len.")
    rng = random.Random(seed)
    clean, corrupt, targets, foils, positions = [], [], [], [], []
    tries = 0
    while len(clean) < n:
        tries += 1
        if tries > 50 * n:
            raise InputError("Could not draw random token sequences that round-trip through text; pass vocab=.")
        toks = rng.sample(pool, 2 * seq_len)
        r, s = toks[:seq_len], toks[seq_len:]
        c_ids, x_ids = r + r[:-1], s + r[:-1]
        c_text, x_text = model.decode(c_ids), model.decode(x_ids)
        enc = model.tokenizer
        if (enc.encode(c_text, add_special_tokens=False) != c_ids
                or enc.encode(x_text, add_special_tokens=False) != x_ids):
            continue
        clean.append(c_text)
        corrupt.append(x_text)
        targets.append(model.decode([r[-1]]))
        foils.append(model.decode([s[-1]]))
        positions.append({"END": 2 * seq_len - 2, "FIRST": seq_len - 1, "PREV": seq_len - 2})
    out = PromptPairs(clean, corrupt, targets, foils, positions,
                      {"task": "induction", "seq_len": seq_len, "seed": seed})
    return out.check(model)


def _round_trip_tokens(model: Model, limit: int = 3000) -> list[int]:
    """Token ids whose text is one ASCII word (2+ letters) that encodes back to exactly that id;
    space-led words (" cat") are preferred, bare words are used only for word-level vocabularies."""
    spaced, bare = [], []
    for tid in range(model.spec.d_vocab):
        text = model.decode([tid])
        word = text.strip()
        if not (word.isalpha() and word.isascii() and len(word) >= 2):
            continue
        if model.tokenizer.encode(text, add_special_tokens=False) == [tid]:
            (spaced if text.startswith(" ") else bare).append(tid)
            if len(spaced) >= limit:
                break
    return spaced if len(spaced) >= 100 else spaced + bare


def factual(model: Model, n: int | None = None, *, seed: int = 0) -> PromptPairs:
    """Country → capital prompts ("The capital of France is" → " Paris").

    Only countries whose capital's first word is one token are kept; each corrupt prompt uses another
    country of the same token length, and the foil is that country's capital. ``n`` (default: all
    usable) prompts, in a seeded order.
    """
    rows = []
    for country, capital in CAPITALS:
        try:
            model.token_id(" " + capital)
        except TokenError:
            continue
        text = FACT_TEMPLATE.format(X=country)
        rows.append((country, " " + capital, text, len(model.to_str_tokens(text))))
    by_len: dict[int, list] = {}
    for r in rows:
        by_len.setdefault(r[3], []).append(r)
    usable = [r for r in rows if len(by_len[r[3]]) >= 2 and len({x[1] for x in by_len[r[3]]}) >= 2]
    if not usable:
        raise TokenError(f"No country → capital pair is usable for {model.name} (capitals must be single tokens).")
    rng = random.Random(seed)
    rng.shuffle(usable)
    usable = usable[: n or len(usable)]
    clean, corrupt, targets, foils, positions = [], [], [], [], []
    prefix = len(model.to_str_tokens(FACT_TEMPLATE.split("{X}")[0].rstrip()))
    for country, capital, text, ln in usable:
        other = rng.choice([r for r in by_len[ln] if r[1] != capital])
        clean.append(text)
        corrupt.append(other[2])
        targets.append(capital)
        foils.append(other[1])
        positions.append({"SUBJ_FIRST": prefix, "SUBJ_LAST": ln - 2, "END": ln - 1})
    meta = {"task": "factual", "template": FACT_TEMPLATE, "seed": seed}
    return PromptPairs(clean, corrupt, targets, foils, positions, meta).check(model)


TASKS = ("ioi", "induction", "factual", "recall")


def task_pairs(model: Model, task: str, n: int = 20, seed: int = 0, seq_len: int = 10) -> PromptPairs:
    """Prompt pairs of a built-in task by name (what ``--task`` and ``{"task": ...}`` inputs build);
    ``seq_len`` is the induction task's sequence length."""
    if task == "ioi":
        return ioi(model, n, seed=seed)
    if task == "induction":
        return induction(model, n, seq_len=seq_len, seed=seed)
    if task == "factual":
        return factual(model, n, seed=seed)
    if task == "recall":
        from lmscope.localization.recall import known_facts

        return known_facts(model, n, seed=seed)
    raise InputError(f"task={task!r}: choose one of {', '.join(TASKS)}.")


def pairs_from_json(model: Model, doc) -> PromptPairs:
    """Prompt pairs from JSON: a list of {clean, corrupt, target, foil} or {"task": "ioi", "n": 50, "seed": 0}
    (induction also takes "seq_len")."""
    if isinstance(doc, PromptPairs):
        return doc
    if isinstance(doc, dict) and "task" in doc:
        extra = set(doc) - {"task", "n", "seed", "seq_len"}
        if extra or ("seq_len" in doc and doc["task"] != "induction"):
            raise InputError(f"pairs input: unknown key(s) {sorted(extra) or ['seq_len']}; a task takes task, n and "
                             "seed (and induction seq_len).")
        return task_pairs(model, doc["task"], doc.get("n", 20), doc.get("seed", 0), doc.get("seq_len", 10))
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise InputError('pairs input: give [{"clean", "corrupt", "target", "foil"}, ...] or {"task": "ioi", "n": 50}.')
    for d in doc:
        missing = {"clean", "corrupt", "target"} - set(d)
        if missing or set(d) - {"clean", "corrupt", "target", "foil"}:
            raise InputError(f"pairs input: each pair needs clean, corrupt and target (and may have foil); got {sorted(d)}.")
    return PromptPairs([d["clean"] for d in doc], [d["corrupt"] for d in doc], [d["target"] for d in doc],
                       [d.get("foil") for d in doc], [{} for _ in doc], {"task": "custom"})


specs.register_input("pairs", pairs_from_json)
