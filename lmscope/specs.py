"""Method specs: every method is a frozen config plus ``run(model, inputs, config) -> Result``, registered once.

A spec names the method, its family, its input kind and its result kind, and the site kinds it needs;
the command line (:mod:`lmscope.cli.generated`) and the web app's JSON API are built from the registry,
so a method behaves the same from Python, the shell and the browser::

    from lmscope import specs
    spec = specs.get("dla")
    res = specs.run(model, "dla", specs.Prompt(IOI, " Mary", " John"), spec.config(by="head"))
    same = specs.run_json(model, "dla", {"prompt": IOI, "target": " Mary", "foil": " John"}, {"by": "head"})

Configs are frozen dataclasses validated in ``__post_init__``; each field's help text lives in its
``metadata["help"]`` (write fields with :func:`option`), and it is what ``lmscope <method> --help`` shows.

Input kinds and their JSON forms:

* ``prompt``: ``"text"`` or ``{"prompt": text, "target": " Mary", "foil": " John"}`` -> :class:`Prompt`;
* ``pairs``: ``[{"clean", "corrupt", "target", "foil"}, ...]`` or a task generator
  ``{"task": "ioi", "n": 50, "seed": 0}`` -> :class:`lmscope.localization.tasks.PromptPairs`;
* ``corpus``: ``"default"``, a text file or a folder (passed on as the string);
* ``labelled``: ``{"dataset": "sst2", "limit": 400}`` or ``{"texts": [...], "labels": [...]}`` ->
  :class:`lmscope.data.LabelledSet`;
* ``sae``: ``"folder"``, ``["folder", ...]`` or ``{"saes": folder_or_list, "corpus": "default"}`` ->
  :class:`lmscope.sae.folders.SAEFolders` (saved SAE folders and the corpus they are evaluated on);
* ``none``: ``null`` (weight-only methods).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

from lmscope.errors import InputError

INPUT_KINDS = ("prompt", "pairs", "corpus", "labelled", "sae", "none")
RESULT_KINDS = ("result", "resultset")
FAMILIES = ("attribution", "localization", "decoding", "sae", "behaviors", "editing")
_REGISTRY: dict[str, MethodSpec] = {}
_INPUT_PARSERS: dict[str, Callable[[Any, Any], Any]] = {}
_LOADED: list[bool] = []  # set once every family module is imported


def option(default: Any = MISSING, help: str = "", *, choices: tuple | None = None, flags: tuple[str, ...] = (),
           values: tuple | None = None, output: str | None = None) -> Any:
    """A config field with its help text (the CLI's --help and the app's form label).

    ``choices`` are checked by :func:`check_config`; ``flags`` overrides the CLI option names (e.g.
    ``("--lens",)``); a ``"--on/--off"`` flag with ``values=(a, b)`` sets the field to a or b;
    ``output="file"`` or ``"folder"`` marks a path the method writes (the CLI checks it before any work).
    """
    if output not in (None, "file", "folder"):
        raise InputError(f"option output={output!r}: use 'file' or 'folder'")
    meta = {"help": help, "choices": choices, "flags": tuple(flags), "values": values, "output": output}
    return field(default=default, metadata=meta) if default is not MISSING else field(metadata=meta)


def fields_of(config_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(config_cls))


def field_help(config_cls: type) -> dict[str, str]:
    """Each field's help text."""
    return {f.name: f.metadata.get("help", "") for f in fields_of(config_cls)}


def field_types(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls)


def check_config(config: Any) -> None:
    """Check every field that declares ``choices``; an InputError naming the choices otherwise."""
    for f in fields_of(type(config)):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value is not None and value not in choices:
            raise InputError(f"{f.name}={value!r} is not a choice: use one of {', '.join(map(str, choices))}.")


@dataclass(frozen=True)
class Prompt:
    """One prompt, with the target (and foil) token where the method explains one."""

    text: str
    target: str | int | None = None
    foil: str | int | None = None

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text:
            raise InputError("The prompt must be a non-empty string.")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. ``run(model, inputs, config) -> Result | ResultSet``.

    ``sites``: site kinds the method reads or patches (a model lacking one is refused, naming the
    method); ``cli``: the command path (default ``(name,)``); ``cli_inputs``: which input options the
    command offers (default: all of its kind's); ``input_defaults``: defaults of those options;
    ``check(inputs, config)``: checks that need no model (files readable, outputs writable), run before the
    method (the CLI runs them before loading the model).
    """

    name: str
    family: str
    input_kind: str
    config: type
    run: Callable[[Any, Any, Any], Any]
    result_kind: str = "result"
    sites: tuple[str, ...] = ()
    cli: tuple[str, ...] = ()
    cli_inputs: tuple[str, ...] | None = None
    input_defaults: dict = field(default_factory=dict)
    summary: str = ""
    check: Callable[[Any, Any], None] | None = None

    def __post_init__(self):
        if self.input_kind not in INPUT_KINDS:
            raise InputError(f"MethodSpec {self.name}: input_kind {self.input_kind!r} not in {INPUT_KINDS}")
        if self.result_kind not in RESULT_KINDS:
            raise InputError(f"MethodSpec {self.name}: result_kind {self.result_kind!r} not in {RESULT_KINDS}")
        if self.family not in FAMILIES:
            raise InputError(f"MethodSpec {self.name}: family {self.family!r} not in {FAMILIES}")
        if not dataclasses.is_dataclass(self.config) or not self.config.__dataclass_params__.frozen:
            raise InputError(f"MethodSpec {self.name}: config must be a frozen dataclass")
        if not self.cli:
            object.__setattr__(self, "cli", (self.name,))
        if not self.summary:
            doc = (self.run.__doc__ or self.config.__doc__ or "").strip()
            plain = re.sub(r":\w+:`~?([^`]+)`|``([^`]+)``", lambda m: m.group(1) or m.group(2), doc.split("\n\n")[0])
            object.__setattr__(self, "summary", " ".join(plain.split()))


def register(spec: MethodSpec) -> MethodSpec:
    """Register ``spec`` (at import of the method's module); registering a name twice is an error."""
    old = _REGISTRY.get(spec.name)
    if old is not None and old.run is not spec.run:
        raise InputError(f"method {spec.name!r} is registered twice ({old.run.__module__}, {spec.run.__module__})")
    _REGISTRY[spec.name] = spec
    return spec


def register_input(kind: str, parser: Callable[[Any, Any], Any]) -> None:
    """Register the JSON parser ``parser(model, doc) -> inputs`` of an input kind (families register theirs)."""
    if kind not in INPUT_KINDS:
        raise InputError(f"input kind {kind!r} not in {INPUT_KINDS}")
    _INPUT_PARSERS[kind] = parser


def load_all() -> None:
    """Import every module of every method family, so that all specs are registered (a new method file
    registers itself: nothing else needs to import it)."""
    if _LOADED:
        return
    for family in FAMILIES:
        package = importlib.import_module(f"lmscope.{family}")
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _LOADED.append(True)


def all_specs() -> list[MethodSpec]:
    load_all()
    return list(_REGISTRY.values())


def get(name: str) -> MethodSpec:
    load_all()
    if name not in _REGISTRY:
        raise InputError(f"No method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def run(model, name: str | MethodSpec, inputs: Any = None, config: Any = None):
    """Run a registered method: the same numbers as its Python function with the same options."""
    spec = name if isinstance(name, MethodSpec) else get(name)
    config = spec.config() if config is None else config
    if not isinstance(config, spec.config):
        raise InputError(f"{spec.name} takes a {spec.config.__name__}, got {type(config).__name__}")
    if spec.check is not None:
        spec.check(inputs, config)
    if spec.sites:
        model.require(spec.sites, method=spec.name)
    return spec.run(model, inputs, config)


# ------------------------------------------------------------------------------------------------ JSON
def _coerce(value: Any, tp: Any, name: str) -> Any:
    """A JSON value converted to the field type (lists to tuples); anything else passes to __post_init__."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name) if len(args) == 1 else value
    if origin is tuple and isinstance(value, list):
        inner = typing.get_args(tp)
        return tuple(_coerce(v, inner[0], name) for v in value) if inner else tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_json(config_cls: type, doc: dict | str | None) -> Any:
    """A config from a JSON object (or its text); unknown keys are an error that lists the fields."""
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as err:
            raise InputError(f"config is not valid JSON ({err})") from err
    doc = doc or {}
    if not isinstance(doc, dict):
        raise InputError(f"config must be a JSON object, got {type(doc).__name__}")
    names = {f.name for f in fields_of(config_cls)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise InputError(f"{config_cls.__name__} has no field(s) {unknown}; fields: {', '.join(sorted(names))}.")
    required = [f.name for f in fields_of(config_cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in doc]
    if required:
        raise InputError(f"{config_cls.__name__} needs {', '.join(required)} (no default); give "
                         f"{'it' if len(required) == 1 else 'them'} in config.")
    types_ = field_types(config_cls)
    return config_cls(**{k: _coerce(v, types_[k], k) for k, v in doc.items()})


def config_to_json(config: Any) -> dict:
    """The config as a JSON object (tuples as lists); ``config_from_json`` reads it back."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _prompt(model, doc):
    if isinstance(doc, Prompt):
        return doc
    if isinstance(doc, str):
        return Prompt(doc)
    if not isinstance(doc, dict) or "prompt" not in doc or set(doc) - {"prompt", "target", "foil"}:
        raise InputError('A prompt input is a string or {"prompt": text, "target": token, "foil": token}.')
    return Prompt(doc["prompt"], doc.get("target"), doc.get("foil"))


def _corpus(model, doc):
    if doc is None:
        return "default"
    if not isinstance(doc, str):
        raise InputError('A corpus input is "default", a text file or a folder of text files.')
    return doc


def _labelled(model, doc):
    from lmscope.data.labelled import LabelledSet, load_labelled

    if isinstance(doc, LabelledSet):
        return doc
    if isinstance(doc, dict) and "texts" in doc:
        return LabelledSet(tuple(doc["texts"]), tuple(str(x) for x in doc["labels"]), doc.get("name", "labelled"))
    if isinstance(doc, dict) and "dataset" in doc:
        extra = set(doc) - {"dataset", "limit", "text_field", "label_field", "seed"}
        if extra:
            raise InputError(f"labelled input: unknown key(s) {sorted(extra)}")
        return load_labelled(doc["dataset"], limit=doc.get("limit"), seed=doc.get("seed", 0),
                             text_field=doc.get("text_field"), label_field=doc.get("label_field"))
    raise InputError('A labelled input is {"dataset": name_or_file, "limit": N} or {"texts": [...], "labels": [...]}.')


def inputs_from_json(model, kind: str, doc: Any) -> Any:
    """The inputs of kind ``kind`` from their JSON form (see the module docstring)."""
    if kind == "none":
        return None
    load_all()
    return _INPUT_PARSERS[kind](model, doc)


def run_json(model, name: str, inputs_json: Any, config_json: dict | str | None = None):
    """What the web app calls: inputs and config as JSON (objects or text), the Result back."""
    spec = get(name)
    if isinstance(inputs_json, str) and spec.input_kind in ("pairs", "labelled"):
        try:
            inputs_json = json.loads(inputs_json)
        except json.JSONDecodeError as err:
            raise InputError(f"{name} takes {spec.input_kind} as JSON; this text is not JSON ({err}).") from None
    config = config_from_json(spec.config, config_json)
    return run(model, spec, inputs_from_json(model, spec.input_kind, inputs_json), config)


register_input("prompt", _prompt)
register_input("corpus", _corpus)
register_input("labelled", _labelled)
register_input("none", lambda model, doc: None)
