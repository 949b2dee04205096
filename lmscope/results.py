"""Result containers: every lmscope method returns a `Result`.

A `Result` is plain data: a tensor of values whose axes carry names and labels (layers, positions,
heads, tokens, components), plus what produced it (method, model, target, parameters). Analysis
and plotting are functions over results (`lmscope.plot`), not methods piling up on the container.

    r = Result(values_LT, axes=(Axis("layer", ...), Axis("token", ...)), method="dla", model="gpt2")
    r.sel(layer=-1).top(5)      # five largest cells of the last layer
    r.save("out/dla")           # out/dla.safetensors (tensors) + out/dla.json (everything else)
    Result.load("out/dla")      # reads that pair back, or one JSON file written by save_json
    r.to_pandas(); r.to_png("dla.png"); r.to_html("dla.html")
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmscope.errors import InputError, ResultFormatError

FORMAT = "lmscope.result"
FORMAT_VERSION = 1
SET_FORMAT = "lmscope.resultset"


@dataclass(frozen=True)
class Axis:
    """A named axis with one label per index: `Axis("token", (" The", " cat"))`, `Axis("layer", range(12))`.

    `name` must be a Python identifier (it is a keyword of `Result.sel`); labels are strings
    (ints are turned into strings) and may repeat, as tokens do.
    """

    name: str
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == "value":
            raise InputError(f"axis name {self.name!r} is not usable: use a Python identifier other "
                             "than 'value', e.g. 'layer' or 'sae_feature'")
        if isinstance(self.labels, str):
            raise InputError(f"axis {self.name!r}: labels must be a sequence of strings, not a string")
        bad = [lab for lab in self.labels if not isinstance(lab, (str, int)) or isinstance(lab, bool)]
        if bad:
            raise InputError(f"axis {self.name!r}: labels must be str or int, got {bad[0]!r}")
        object.__setattr__(self, "labels", tuple(str(lab) for lab in self.labels))

    def __len__(self) -> int:
        return len(self.labels)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _lmscope_version() -> str:
    try:
        from lmscope import __version__
    except ImportError:
        return "0.1.0"
    return str(__version__)


def _json_default(obj: Any) -> Any:
    """Let numpy and torch scalars/arrays through as numbers and lists; refuse anything else."""
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _plain_json(obj: Any, what: str) -> Any:
    """`obj` as it will read back from JSON (tuples become lists, keys strings), or InputError."""
    try:
        return json.loads(json.dumps(obj, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise InputError(f"Result.{what} must be JSON-serialisable with finite floats ({err})") from err


def _as_cpu_tensor(x: Any, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{what} must be a tensor, numpy array or nested list ({err})") from err
    return x.detach().to("cpu").contiguous()


def _tensor_to_lists(t: torch.Tensor) -> Any:
    """Nested lists in axis order; NaN and infinities become None (strict JSON has no NaN)."""
    if not t.is_floating_point():
        return t.tolist()
    arr = t.double().numpy()
    out = arr.astype(object)
    out[~np.isfinite(arr)] = None
    return out.tolist()


def _tensor_from_lists(spec: dict) -> torch.Tensor:
    """Inverse of `_tensor_to_lists`, from {"values": nested lists, "dtype": ..., "shape": [...]}."""
    dtype = getattr(torch, spec["dtype"])
    arr = np.array(spec["values"], dtype=np.float64 if dtype.is_floating_point else np.int64)
    return torch.as_tensor(arr.reshape(spec["shape"])).to(dtype)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then `os.replace` it: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


@dataclass(eq=False)
class Result:
    """Values over labelled axes, with the provenance needed to reproduce them.

    values: float32 tensor (integer tensors stay integer), `values.shape[i] == len(axes[i])`.
    target: what was explained, e.g. {"target": " Mary", "target_id": 123, "foil": " John"}.
    params, meta: JSON-serialisable dicts (method parameters; anything else, e.g. token lists).
    extras: more named tensors of any shape, saved alongside `values`.
    created, lmscope_version: filled in automatically; kept when a result is loaded.
    """

    values: torch.Tensor
    axes: tuple[Axis, ...]
    method: str
    model: str
    target: dict | None = None
    params: dict = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    created: str = field(default_factory=_now)
    lmscope_version: str = field(default_factory=_lmscope_version)

    def __post_init__(self) -> None:
        values = _as_cpu_tensor(self.values, "Result.values")
        if values.is_complex():
            raise InputError("Result.values must be real, got a complex tensor")
        if values.is_floating_point() or values.dtype == torch.bool:
            values = values.to(torch.float32)
        axes = (self.axes,) if isinstance(self.axes, Axis) else tuple(self.axes)
        if not all(isinstance(a, Axis) for a in axes):
            raise InputError("Result.axes must be a tuple of Axis, e.g. (Axis('layer', labels),)")
        names = [a.name for a in axes]
        if len(set(names)) != len(names):
            raise InputError(f"axis names must be unique, got {names}")
        if values.ndim != len(axes):
            raise InputError(f"values have shape {tuple(values.shape)} but {len(axes)} axes {names}: "
                             "pass one Axis per dimension")
        for i, (axis, size) in enumerate(zip(axes, values.shape)):
            if size != len(axis):
                raise InputError(f"axis {axis.name!r} (dimension {i}) has {len(axis)} labels but values "
                                 f"have length {size} there: give one label per index")
        if not isinstance(self.method, str) or not self.method or not isinstance(self.model, str):
            raise InputError("Result.method (e.g. 'dla') and Result.model (a name) must be strings")
        if any(not isinstance(name, str) or not name for name in self.extras):
            raise InputError(f"extras names must be non-empty strings, got {list(self.extras)}")
        self.extras = {k: _as_cpu_tensor(t, f"extras[{k!r}]") for k, t in self.extras.items()}
        self.values, self.axes = values, axes
        for name in ("target", "params", "meta"):
            value = getattr(self, name)
            if not isinstance(value, dict) and not (name == "target" and value is None):
                raise InputError(f"Result.{name} must be a dict, got {type(value).__name__}")
            setattr(self, name, _plain_json(value, name))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def axis_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def provenance(self) -> dict:
        """Who made this: method, model, params, lmscope version and creation time (UTC)."""
        return {"method": self.method, "model": self.model, "params": self.params,
                "lmscope_version": self.lmscope_version, "created": self.created}

    def __repr__(self) -> str:
        dims = "×".join(f"{a.name}[{len(a)}]" for a in self.axes) or "scalar"
        text = f"Result(method={self.method!r}, model={self.model!r}, axes={dims}"
        finite = self.values[torch.isfinite(self.values)]
        if finite.numel():
            text += f", range=[{finite.min().item():.4g}, {finite.max().item():.4g}]"
        if self.target and "target" in self.target:
            text += f", target={self.target['target']!r}"
        return text + ")"

    def sel(self, **selections: int | str) -> Result:
        """Drop axes by picking one index (int, negative allowed) or one label (str) on each.

        `r.sel(layer=-1, token=" Mary")` -> the result over the remaining axes; the choice is
        recorded in `meta["selected"]`. A label that occurs twice is refused: pass its index.
        """
        result = self
        for name, key in selections.items():
            if name not in result.axis_names:
                raise InputError(f"no axis {name!r}; this result has axes {list(result.axis_names)}")
            dim = result.axis_names.index(name)
            axis = result.axes[dim]
            index = _resolve_index(axis, key)
            chosen = {"index": index, "label": axis.labels[index]}
            selected = {**result.meta.get("selected", {}), name: chosen}
            result = replace(
                result,
                values=result.values.select(dim, index),
                axes=result.axes[:dim] + result.axes[dim + 1 :],
                meta={**result.meta, "selected": selected},
            )
        return result

    def top(self, k: int = 10, largest: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The `k` largest (or smallest) cells as `(labels per axis, value)`, best first; NaN skipped."""
        if not isinstance(k, int) or k < 1:
            raise InputError(f"top(k) needs a positive integer k, got {k!r}")
        flat = self.values.reshape(-1)
        candidates = torch.arange(flat.numel())
        if flat.is_floating_point():
            candidates = candidates[~torch.isnan(flat)]
        k = min(k, candidates.numel())
        order = torch.topk(flat[candidates].double(), k, largest=largest, sorted=True).indices
        return [(self._labels_at(i), flat[i].item()) for i in candidates[order].tolist()]

    def _labels_at(self, flat_index: int) -> tuple[str, ...]:
        """The labels of the cell at a row-major flat index."""
        labels = []
        for axis in reversed(self.axes):
            flat_index, i = divmod(flat_index, len(axis))
            labels.append(axis.labels[i])
        return tuple(reversed(labels))

    def to_dict(self, include_tensors: bool = True) -> dict:
        """A JSON-able dict: method, model, axes, values (nested lists, None for NaN/inf), target,
        params, meta, provenance, extras. `include_tensors=False` leaves out the numbers of
        `values` and extras and keeps their dtype and shape, as `save` does."""

        def tensor_doc(t: torch.Tensor) -> dict:
            doc = {"dtype": _dtype_name(t), "shape": list(t.shape)}
            return doc | {"values": _tensor_to_lists(t)} if include_tensors else doc

        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "method": self.method, "model": self.model,
            "axes": [{"name": a.name, "labels": list(a.labels)} for a in self.axes],
            **tensor_doc(self.values),
            "target": self.target, "params": self.params, "meta": self.meta,
            "provenance": self.provenance,
            "extras": {name: tensor_doc(t) for name, t in self.extras.items()},
        }

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write `to_dict()` as one strict JSON file (what every CLI `--json PATH` writes)."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, indent=1)
        return atomic_write_bytes(path, text.encode("utf-8"))

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write `<stem>.safetensors` (values, extras) and `<stem>.json` (the rest), each atomically;
        `path` may end in .json, .safetensors or neither. Returns (json_path, safetensors_path)."""
        from safetensors.torch import save as save_tensors

        stem = _stem(path)
        tensors = {"values": self.values.clone()}
        tensors |= {f"extras.{name}": t.clone() for name, t in self.extras.items()}
        st_path = atomic_write_bytes(f"{stem}.safetensors", save_tensors(tensors, {"format": FORMAT}))
        doc = self.to_dict(include_tensors=False)
        text = json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=1)
        return atomic_write_bytes(f"{stem}.json", text.encode("utf-8")), st_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Read a result written by `save` (the .json/.safetensors pair) or by `save_json`; `path`
        may end in .json, .safetensors or neither. Missing or corrupt files raise ResultFormatError."""
        stem = _stem(path)
        json_path, st_path = Path(f"{stem}.json"), Path(f"{stem}.safetensors")
        if not json_path.exists():
            found = f"found {st_path} but " if st_path.exists() else ""
            raise ResultFormatError(
                f"cannot load result {stem}: {found}{json_path} does not exist; a saved result is "
                "the pair written by Result.save(path) or one file written by Result.save_json(path)"
            )
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(json_path, f"not valid JSON ({err})") from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise _corrupt(json_path, f'not an lmscope result (no "format": "{FORMAT}" key)')
        try:
            return cls.from_dict(doc, st_path)
        except (AttributeError, KeyError, TypeError, ValueError, InputError) as err:
            problem = f"does not describe a valid result ({type(err).__name__}: {err})"
            raise _corrupt(json_path, problem) from err

    @classmethod
    def from_dict(cls, doc: dict, st_path: Path | None = None) -> Result:
        """Inverse of `to_dict` (tensors inline), or of `save`'s JSON with its safetensors at `st_path`."""
        if "values" in doc:  # one file from save_json
            values = _tensor_from_lists(doc)
            extras = {name: _tensor_from_lists(spec) for name, spec in doc["extras"].items()}
        else:
            values, extras = _read_tensors(st_path)
        prov = doc["provenance"]
        axes = tuple(Axis(a["name"], tuple(a["labels"])) for a in doc["axes"])
        return cls(values, axes, doc["method"], doc["model"], doc["target"], doc["params"],
                   extras, doc["meta"], prov["created"], prov["lmscope_version"])

    def to_pandas(self):
        """Long-form DataFrame: per axis a label column `<axis>` and an index column `<axis>_idx`,
        then `value`; one row per cell, in row-major order."""
        import pandas as pd

        columns: dict[str, Any] = {}
        if self.axes:
            grid = np.indices(self.shape).reshape(len(self.axes), -1)
            for axis, idx in zip(self.axes, grid):
                labels = np.empty(len(axis), dtype=object)
                labels[:] = axis.labels
                columns[axis.name] = labels[idx]
                columns[f"{axis.name}_idx"] = idx.astype(np.int64)
        columns["value"] = self.values.reshape(-1).numpy()
        return pd.DataFrame(columns)

    def to_png(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Heat map (2-D) or bar chart (1-D) as PNG; options in `lmscope.plot.heatmap_png`."""
        from lmscope import plot
        return plot.heatmap_png(self, path, **kwargs)

    def to_html(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """A self-contained interactive HTML page; see `lmscope.plot.to_html`."""
        from lmscope import plot
        return plot.save_html(self, path, title=title)

    def _repr_html_(self) -> str | None:
        from lmscope import plot  # Jupyter shows this; None (3-D or huge results) falls back to repr
        try:
            return plot.html_fragment(self)
        except InputError:
            return None


def _resolve_index(axis: Axis, key: Any) -> int:
    """An index along `axis` from an int (negative counts from the end) or a unique label."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not -len(axis) <= int(key) < len(axis):
            raise InputError(f"index {key} is out of range for axis {axis.name!r} of length {len(axis)}")
        return int(key) % len(axis)
    if not isinstance(key, str):
        raise InputError(f"select on axis {axis.name!r} with an int index or a str label, got {key!r}")
    hits = [i for i, label in enumerate(axis.labels) if label == key]
    if not hits:
        shown = ", ".join(map(repr, axis.labels[:10])) + (", ..." if len(axis) > 10 else "")
        raise InputError(f"label {key!r} not on axis {axis.name!r} (labels: {shown})")
    if len(hits) > 1:
        raise InputError(f"label {key!r} occurs at indices {hits} on axis {axis.name!r}; pass the index")
    return hits[0]


def _corrupt(path: Path, problem: str) -> ResultFormatError:
    return ResultFormatError(
        f"{path}: {problem}; the file is corrupt, truncated or from another run (keep the .json and "
        ".safetensors of one result together); re-run the analysis to write it again"
    )


def _read_tensors(st_path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not st_path.exists():
        raise ResultFormatError(f"{st_path} does not exist; Result.save writes it beside the .json file: "
                                "keep both together, or re-run the analysis")
    try:
        tensors = load_file(str(st_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise _corrupt(st_path, f"not a readable safetensors file ({err})") from err
    if "values" not in tensors:
        raise _corrupt(st_path, "no 'values' tensor")
    extras = {k.removeprefix("extras."): v for k, v in tensors.items() if k.startswith("extras.")}
    return tensors["values"], extras


class ResultSet(Mapping):
    """Several named Results of one method run (AtP's node kinds, a head's OV and QK circuits), as one
    serialisable value: ``rs["head"]`` is a Result; ``save_json``/``to_dict`` write them all in one
    document (``{"format": "lmscope.resultset", "results": {name: Result.to_dict()}}``), ``load`` and
    ``from_dict`` read it back."""

    def __init__(self, results: Mapping[str, Result], method: str, model: str, meta: dict | None = None) -> None:
        if not results or not all(isinstance(k, str) and k and isinstance(v, Result) for k, v in results.items()):
            raise InputError("ResultSet needs a non-empty mapping of names (str) to Result objects")
        self.results, self.method, self.model = dict(results), method, model
        self.meta = _plain_json(meta or {}, "meta")

    def __getitem__(self, name: str) -> Result:
        if name not in self.results:
            raise KeyError(f"{name!r} is not in this result set; it holds {sorted(self.results)}")
        return self.results[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __repr__(self) -> str:
        return f"ResultSet(method={self.method!r}, model={self.model!r}, results={list(self.results)})"

    def to_dict(self, include_tensors: bool = True) -> dict:
        return {"format": SET_FORMAT, "format_version": FORMAT_VERSION, "method": self.method, "model": self.model,
                "meta": self.meta, "results": {k: r.to_dict(include_tensors) for k, r in self.results.items()}}

    @classmethod
    def from_dict(cls, doc: dict) -> ResultSet:
        if not isinstance(doc, dict) or doc.get("format") != SET_FORMAT:
            raise ResultFormatError(f'not an lmscope result set (no "format": "{SET_FORMAT}" key)')
        return cls({k: Result.from_dict(d) for k, d in doc["results"].items()}, doc["method"], doc["model"],
                   doc.get("meta", {}))

    def save_json(self, path: str | os.PathLike) -> Path:
        text = json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, indent=1)
        return atomic_write_bytes(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ResultSet:
        """Read a file written by `save_json`."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(doc)
        except FileNotFoundError as err:
            raise ResultFormatError(f"{path} does not exist; write it with ResultSet.save_json(path)") from err
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError,
                InputError) as err:
            raise _corrupt(path, f"does not describe a valid result set ({type(err).__name__}: {err})") from err
