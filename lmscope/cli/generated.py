"""The method commands, generated from the spec registry (:mod:`lmscope.specs`).

For every registered method, ``lmscope <name>`` (or the spec's ``cli`` path, e.g. ``lens train``) gets
one option per config field (name, type, default and help from the dataclass field), the options of its
input kind (``--prompt/--target/--foil``, ``--clean/--corrupt/--task ...``, ``--corpus``,
``--dataset ...``), and the common ``--model``, ``--json``, ``--html`` and ``--png``. The command parses,
runs the spec and prints the method's table (:mod:`lmscope.cli.views`); nothing else happens here.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from lmscope import specs
from lmscope.cli import common, views
from lmscope.errors import InputError

_UNSET = object()

# input kind -> option key -> (flags, type, default, help); default ... = required; flags without "--": a positional
# argument (its metavar)
INPUT_OPTIONS: dict[str, dict[str, tuple]] = {
    "prompt": {
        "text": (("--prompt",), str, ..., "The prompt."),
        "source": (("--source",), str, ..., "Source prompt whose hidden state is read."),
        "target": (("--target",), Optional[str], None, "Target token, e.g. ' Mary' (mind the leading space)."),
        "foil": (("--foil",), Optional[str], None, "Foil token: explain the difference target − foil."),
    },
    "pairs": {
        "clean": (("--clean",), Optional[str], None, "Clean prompt (the behaviour is present)."),
        "corrupt": (("--corrupt",), Optional[str], None, "Corrupted prompt of the same token length."),
        "target": (("--target",), Optional[str], None, "Clean answer token, e.g. ' Mary' (mind the leading space)."),
        "foil": (("--foil",), Optional[str], None, "Competing token, e.g. ' John'; metric: logit(target) − "
                                                   "logit(foil)."),
        "task": (("--task",), Optional[str], None, "Instead of one pair: a built-in task (ioi | induction | "
                                                   "factual | recall: GeoNames facts the model knows; default "
                                                   "ioi when no pair is given)."),
        "n": (("--n",), int, 20, "Prompts of the task."),
        "seed": (("--seed",), int, 0, "Seed of the task generator."),
    },
    "corpus": {"corpus": (("--corpus",), str, "default", "'default', a .txt file or a folder of text files.")},
    "labelled": {
        "dataset": (("--dataset",), Optional[str], None, "Built-in set (sst2, cola, spam, sae-probes:<stem>) or a "
                                                         "CSV/TSV/JSONL file with text and label columns."),
        "limit": (("--limit",), int, 400, "Use at most this many examples (class-balanced sample)."),
        "text_field": (("--text-field",), Optional[str], None, "Text column of the file (default: found by name)."),
        "label_field": (("--label-field",), Optional[str], None, "Label column of the file (default: found by "
                                                                  "name)."),
        "list_sets": (("--list",), bool, False, "List the built-in labelled sets and exit."),
    },
    "sae": {
        "folder": (("SAE_DIR",), Path, ..., "SAE folder (cfg.json + sae_weights.safetensors)."),
        "folders": (("SAE_DIRS",), list[Path], ..., "SAE folders (evaluated with `sae eval` first, or evaluated now)."),
        "corpus": (("--corpus",), str, "default", "Corpus whose held-out split is used: 'default', a .txt file or a "
                                                  "folder of text files."),
    },
    "none": {},
}
NO_MODEL_INPUTS = ("labelled", "sae")  # input kinds parsed before the model loads
DEFAULT_INPUTS = {"prompt": ("text", "target", "foil")}


def input_keys(spec: specs.MethodSpec) -> tuple[str, ...]:
    if spec.cli_inputs is not None:
        return spec.cli_inputs
    return DEFAULT_INPUTS.get(spec.input_kind, tuple(INPUT_OPTIONS[spec.input_kind]))


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(annotation typer understands, is a tuple field)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return Optional[inner[0]], False
    if origin is tuple:
        return Optional[list[typing.get_args(tp)[0]]], True
    return tp, False


def _config_params(spec: specs.MethodSpec, optional_required: bool) -> list[inspect.Parameter]:
    params = []
    hints = specs.field_types(spec.config)
    for f in specs.fields_of(spec.config):
        meta = f.metadata
        tp, is_tuple = _cli_type(hints[f.name])
        flags = meta.get("flags") or (f"--{f.name.replace('_', '-')}",)
        required = f.default is dataclasses.MISSING
        values = meta.get("values")
        if values is not None:
            default = None if required else f.default == values[0]
            tp = bool
        elif is_tuple:
            default = None
        elif required:
            default = None if optional_required else ...
            if optional_required:
                tp = Optional[tp]
        else:
            default = f.default
        if tp is bool and "/" not in flags[0] and len(flags) == 1 and flags[0].startswith("--") and values is None \
                and default is True:
            flags = (f"{flags[0]}/--no-{flags[0][2:]}",)
        opt = typer.Option(default, *flags, help=meta.get("help", ""))
        params.append(inspect.Parameter(f"cf_{f.name}", inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=tp))
    return params


def _input_params(spec: specs.MethodSpec, optional_required: bool) -> list[inspect.Parameter]:
    params = []
    table = INPUT_OPTIONS[spec.input_kind]
    for key in input_keys(spec):
        flags, tp, default, help_ = table[key]
        default = spec.input_defaults.get(key, default)
        if default is ... and optional_required:
            default, tp = None, Optional[tp]
        positional = not flags[0].startswith("-")
        made = (typer.Argument(default, metavar=flags[0], help=help_) if positional
                else typer.Option(default, *flags, help=help_))
        params.append(inspect.Parameter(f"in_{key}", inspect.Parameter.KEYWORD_ONLY, default=made, annotation=tp))
    return params


def _common_params(spec: specs.MethodSpec) -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    out = [inspect.Parameter("model", kw, default=common.ModelOpt, annotation=Optional[str]),
           inspect.Parameter("json", kw, default=common.JsonOpt, annotation=Optional[Path])]
    if spec.name not in views.NO_PLOT:
        out += [inspect.Parameter("html", kw, default=common.HtmlOpt, annotation=Optional[Path]),
                inspect.Parameter("png", kw, default=common.PngOpt, annotation=Optional[Path])]
    return out


def build_config(spec: specs.MethodSpec, kw: dict) -> Any:
    fields = {}
    for f in specs.fields_of(spec.config):
        value = kw[f"cf_{f.name}"]
        values = f.metadata.get("values")
        if values is not None and value is not None:
            value = values[0] if value else values[1]
        if value is None and f.default is dataclasses.MISSING:
            flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]
            raise InputError(f"Missing option {flag}: {f.metadata.get('help', '')}")
        if value is None and _cli_type(specs.field_types(spec.config)[f.name])[1]:
            continue  # a tuple field left to its default
        if isinstance(value, list):
            value = tuple(value)
        fields[f.name] = value
    return spec.config(**fields)


def check_config_outputs(spec: specs.MethodSpec, config: Any) -> None:
    """Config fields the method writes (``specs.option(output=...)``) must be writable: checked before any work."""
    for f in specs.fields_of(spec.config):
        kind, value = f.metadata.get("output"), getattr(config, f.name)
        if kind and value is not None:
            flag = (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0]
            common.check_output(Path(value), flag, folder=kind == "folder")


def build_inputs(spec: specs.MethodSpec, kw: dict, model) -> Any:
    given = {k[3:]: v for k, v in kw.items() if k.startswith("in_")}
    kind = spec.input_kind
    if kind == "prompt":
        text = given.get("text") or given.get("source")
        if text is None:
            raise InputError("Give --prompt TEXT.")
        return specs.Prompt(text, given.get("target"), given.get("foil"))
    if kind == "pairs":
        from lmscope.localization.tasks import pair, task_pairs

        parts = [given.get(k) for k in ("clean", "corrupt", "target", "foil")]
        task = given.get("task") or (None if any(p is not None for p in parts) or "task" not in input_keys(spec)
                                     else "ioi")  # nothing given: the IOI task
        if task:
            return task_pairs(model, task, given.get("n", 20), given.get("seed", 0))
        if given.get("clean") and given.get("corrupt") and given.get("target"):
            return pair(given["clean"], given["corrupt"], given["target"], given.get("foil"))
        offer = "--clean, --corrupt and --target (and --foil)"
        raise InputError(f"Give {offer}" + (", or --task ioi|induction." if "task" in input_keys(spec) else "."))
    if kind == "corpus":
        return given.get("corpus", "default")
    if kind == "labelled":
        from lmscope.data.labelled import load_labelled

        if given.get("dataset") is None:
            raise InputError("Give --dataset NAME_OR_FILE (or --list to see the built-in sets).")
        return load_labelled(given["dataset"], limit=given.get("limit"), text_field=given.get("text_field"),
                             label_field=given.get("label_field"))
    if kind == "sae":
        from lmscope.sae.folders import SAEFolders

        folders = given["folders"] if given.get("folders") is not None else [given["folder"]]
        return SAEFolders(tuple(str(f) for f in folders), given.get("corpus") or "default")
    return None


def make_command(spec: specs.MethodSpec, group_callback: bool = False):
    """The typer command function of ``spec`` (a group callback when it has subcommands, e.g. ``lens``)."""
    kw_params = _input_params(spec, group_callback) + _config_params(spec, group_callback) + _common_params(spec)

    def command(*args, **kw):
        ctx = kw.pop("ctx", None) or (args[0] if args else None)
        if group_callback and ctx is not None and ctx.invoked_subcommand is not None:
            return
        if kw.get("in_list_sets"):
            from lmscope.data.labelled import builtin_names

            for name in builtin_names():
                common.out.print(name)
            return
        if group_callback and kw.get("in_text") is None and kw.get("in_source") is None:
            sub = " or ".join(f"`lmscope {spec.cli[0]} {c}`" for c in GROUP_SUBCOMMANDS.get(spec.cli[0], ()))
            flag = "--source" if "source" in input_keys(spec) else "--prompt"
            raise InputError(f"Give {flag} TEXT (or a subcommand: {sub}).")
        config = build_config(spec, kw)
        check_config_outputs(spec, config)
        data, model_name = None, kw.get("model")
        if spec.input_kind in NO_MODEL_INPUTS:
            data = build_inputs(spec, kw, None)
            if spec.check is not None:
                spec.check(data, config)
            if spec.input_kind == "sae" and model_name is None:
                model_name = data.model_name()  # the model the SAE was trained on
        model = common.load_model(model_name)
        inputs = data if data is not None else build_inputs(spec, kw, model)
        result = specs.run(model, spec, inputs, config)
        shown, written = views.view(spec.name, result, config)
        for item in shown:
            common.out.print(item)
        common.write_outputs(written, kw.get("json"), kw.get("html"), kw.get("png"))

    params = kw_params
    if group_callback:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)] + params
    command.__signature__ = inspect.Signature(params)
    command.__name__ = spec.name.replace("-", "_")
    command.__doc__ = spec.summary
    return common.friendly(command)


GROUP_SUBCOMMANDS: dict[str, tuple[str, ...]] = {}
# subcommands that may also be written as a flag of their group: `lmscope attribute --evaluate ...`
FLAG_SUBCOMMANDS: dict[str, tuple[str, ...]] = {"attribute": ("evaluate",)}


class FlagGroup(TyperGroup):
    """A command group that reads ``--<sub>`` anywhere in its arguments as its subcommand ``<sub>``."""

    def parse_args(self, ctx, args):
        flags = {f"--{sub}": sub for sub in FLAG_SUBCOMMANDS.get(self.name or "", ())}
        hit = next((a for a in args if a in flags), None)
        if hit is not None:
            args = [flags[hit], *(a for a in args if a != hit)]
        return super().parse_args(ctx, args)


def register(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Add a command for every registered method to ``app`` (subcommands into ``groups``, created if missing)."""
    all_specs = specs.all_specs()
    for spec in all_specs:
        if len(spec.cli) == 2:
            GROUP_SUBCOMMANDS.setdefault(spec.cli[0], ())
            GROUP_SUBCOMMANDS[spec.cli[0]] += (spec.cli[1],)
    for spec in all_specs:
        if len(spec.cli) == 1 and spec.cli[0] in GROUP_SUBCOMMANDS:
            group = groups.setdefault(spec.cli[0], typer.Typer(no_args_is_help=False, help=spec.summary,
                                                               cls=FlagGroup))
            group.callback(invoke_without_command=True)(make_command(spec, group_callback=True))
            app.add_typer(group, name=spec.cli[0])
    for spec in all_specs:
        if len(spec.cli) == 1 and spec.cli[0] not in GROUP_SUBCOMMANDS:
            app.command(spec.cli[0], help=spec.summary)(make_command(spec))
        elif len(spec.cli) == 2:
            if spec.cli[0] not in groups:
                groups[spec.cli[0]] = typer.Typer(no_args_is_help=True)
                app.add_typer(groups[spec.cli[0]], name=spec.cli[0])
            groups[spec.cli[0]].command(spec.cli[1], help=spec.summary)(make_command(spec))
