"""``lmscope app``: a single-page explorer and a JSON API over the method specs; this module holds the API's
state and checks (:class:`App`), :mod:`lmscope.app.web` serves it (Starlette on uvicorn).

The API has no method logic of its own: ``POST /api/run {"method", "inputs", "config"}`` answers
``{"result": specs.run_json(model, method, inputs, config).to_dict(), "meta": {...}}``, with the latency
of the call (queue wait and compute, in ms), whether it came from the cache and its job id. ``GET /api/info``
lists the model and the methods the app may run (their config fields, defaults and help); ``GET
/api/jobs/<id>`` says where a job stands (queued at which place, running for how long, the library's progress
bars); ``GET /`` and ``/static/<file>`` serve the page from the package (no CDN).

Safety: binds 127.0.0.1 unless told otherwise; one lock per model (hooks are global to a model) and one
worker thread running its jobs, a bounded queue of waiting jobs (503 past it), limits on body size, prompt
tokens and generated tokens (413), every bad input a 4xx with the library's message. Methods whose inputs are
prompts, prompt pairs or nothing are served, and no config option that names a file. SAE methods that only
read (``SAE_METHODS``) are served when the app was started with an SAE folder (``App(sae_dir=...)``,
``lmscope app --sae-dir DIR``): their input names a folder *under* that root (``{"saes": "name"}``, listed
by ``/api/info``), resolved and checked to stay inside it, on the built-in corpus only. The server reads no
other user files and unpickles nothing (SAE weights are safetensors, their config JSON).

Jobs run inside the app's :class:`~lmscope.models.RunMemo`: a forward the model already ran for a prompt is
read back instead of run again (the graph's node clicks; the values are a fresh run's, bit for bit).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import RunMemo

SERVED_INPUTS = ("prompt", "pairs", "none")
SAE_METHODS = ("sae-prompt", "sae-features")  # SAE methods that read their folder and write nothing
PROMPT_FIELDS = ("prompt", "corrupt", "target_prompt", "positive", "negative")  # config text run as prompts
COUNT_LIMITS = {"max_new_tokens": 128, "generate": 128, "contexts": 64}  # generated tokens, corpus contexts
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _file_fields(spec: specs.MethodSpec) -> list[str]:
    words = ("path", "dir", "folder", "html", "png", "store", "file")
    return [f.name for f in specs.fields_of(spec.config) if f.name == "out" or any(w in f.name for w in words)]


def served_specs(sae: bool = False) -> dict[str, specs.MethodSpec]:
    """The methods the app runs: those whose inputs are prompts, prompt pairs or nothing (file options are
    refused per request), and with ``sae`` the read-only SAE methods."""
    return {s.name: s for s in specs.all_specs() if s.input_kind in SERVED_INPUTS or (sae and s.name in SAE_METHODS)}


def sae_folders(root: Path, depth: int = 3, limit: int = 200) -> list[str]:
    """Folders under ``root`` holding an SAE (``cfg.json``), as paths relative to it (symlinks not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if "cfg.json" in files and rel.parts:
            found.append(rel.as_posix())
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if len(rel.parts) < depth else []
        if len(found) >= limit:
            break
    return sorted(found)


def _fields_doc(config_cls: type) -> list[dict]:
    types_ = specs.field_types(config_cls)
    return [{"name": f.name, "default": json.loads(json.dumps(None if f.default is MISSING else f.default, default=str)),
             "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices"),
             "type": getattr(types_[f.name], "__name__", str(types_[f.name]))} for f in specs.fields_of(config_cls)]


class App:
    """The API's state: one model, its lock, a queue bound and an LRU cache of Result JSON per request."""

    def __init__(self, model, *, max_tokens: int = 512, max_body: int = 1 << 20, max_queue: int = 32,
                 cache_size: int = 128, sae_dir: str | os.PathLike | None = None, memo_bytes: int = 2 << 30):
        self.model, self.max_tokens, self.max_body, self.max_queue = model, max_tokens, max_body, max_queue
        self.sae_root = None if sae_dir is None else Path(sae_dir).resolve()
        if self.sae_root is not None and not self.sae_root.is_dir():
            raise InputError(f"--sae-dir {sae_dir}: not a folder; give the folder that holds your SAE folders.")
        self.lock = threading.Lock()  # one model, one forward at a time (run by one worker thread in the server)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="lmscope-model")  # the model's worker thread
        self.memo = RunMemo(model, max_bytes=memo_bytes)  # the forwards of recent prompts (node clicks reuse them)
        self.max_jobs = 256
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._seq = itertools.count(1)
        self._state = threading.Lock()  # guards the cache and the queue count
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.cache_size, self.waiting = cache_size, 0
        self.methods = served_specs(sae=self.sae_root is not None)

    def info(self) -> dict:
        s = self.model.spec
        return {"model": self.model.name, "n_layers": s.n_layers, "n_heads": s.n_heads, "d_model": s.d_model,
                "max_tokens": self.max_tokens,
                "saes": [] if self.sae_root is None else sae_folders(self.sae_root),
                "methods": [{"name": m.name, "family": m.family, "input_kind": m.input_kind, "summary": m.summary,
                             "fields": _fields_doc(m.config)}
                            for m in self.methods.values()]}

    def _sae_inputs(self, name: str, inputs: Any) -> dict:
        """The SAE folder named in ``inputs`` (relative to the root the app was started with), checked to lie
        inside it, as the spec's JSON input on the built-in corpus."""
        if isinstance(inputs, dict) and set(inputs) <= {"saes", "corpus"}:
            if inputs.get("corpus", "default") not in (None, "default"):
                raise HTTPError(403, "The app runs SAEs on the built-in corpus only: leave corpus out.")
            inputs = inputs.get("saes")
        if not isinstance(inputs, str) or not inputs:
            raise HTTPError(400, 'An SAE input is {"saes": "folder"}, a folder under the app\'s --sae-dir '
                                 '(/api/info lists them).')
        rel = Path(inputs)
        try:
            folder = (self.sae_root / rel).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long
            folder = None
        if rel.is_absolute() or ".." in rel.parts or folder is None or not folder.is_relative_to(self.sae_root):
            raise HTTPError(403, f"{inputs!r} is not a folder under the app's --sae-dir; name one that "
                                 "/api/info lists.")
        if not (folder / "cfg.json").is_file():
            raise HTTPError(404, f"No SAE folder {inputs!r} under the app's --sae-dir (/api/info lists them).")
        return {"saes": str(folder), "corpus": "default"}

    def _check_sizes(self, config: dict) -> None:
        for key, most in COUNT_LIMITS.items():
            n = config.get(key)
            if isinstance(n, int) and not isinstance(n, bool) and n > most:
                raise HTTPError(413, f"{key}={n}: the app takes at most {most} (use the command line for more).")
        self._check_prompts([config[k] for k in PROMPT_FIELDS if isinstance(config.get(k), str)])

    def _check_prompts(self, inputs: Any) -> None:
        texts = []
        if isinstance(inputs, list) and all(isinstance(x, str) for x in inputs):
            texts = inputs
        elif isinstance(inputs, str):
            texts = [inputs]
        elif isinstance(inputs, dict):
            texts = [v for k, v in inputs.items() if k in ("prompt", "clean", "corrupt") and isinstance(v, str)]
            if isinstance(inputs.get("n"), int) and inputs["n"] > 256:
                raise HTTPError(413, f"n={inputs['n']}: the app runs at most 256 generated pairs.")
        elif isinstance(inputs, list):
            if len(inputs) > 256:
                raise HTTPError(413, f"{len(inputs)} pairs: the app runs at most 256.")
            texts = [v for d in inputs if isinstance(d, dict) for k, v in d.items()
                     if k in ("clean", "corrupt") and isinstance(v, str)]
        for text in texts:
            if len(text) > 20 * self.max_tokens:
                raise HTTPError(413, f"A prompt of {len(text)} characters is too long for the app "
                                     f"(at most {self.max_tokens} tokens; start it with --max-tokens N for more).")
            n = len(self.model.to_str_tokens(text)) if text else 0
            if n > self.max_tokens:
                raise HTTPError(413, f"A prompt of {n} tokens is too long for the app (at most {self.max_tokens}; "
                                     "start it with --max-tokens N for more).")

    def submit(self, body: Any, job_id: str | None = None) -> Job:
        """Check ``{"method", "inputs", "config"}`` (a 4xx ``HTTPError`` for bad input), answer it from the cache
        or queue it (503 when ``max_queue`` jobs already wait); :meth:`work` computes a queued job."""
        t0 = time.perf_counter()
        if not isinstance(body, dict) or not isinstance(body.get("method"), str):
            raise HTTPError(400, 'Send {"method": name, "inputs": ..., "config": {...}}.')
        extra = set(body) - {"method", "inputs", "config"}
        if extra:
            raise HTTPError(400, f"Unknown key(s) {sorted(extra)}: send method, inputs and config.")
        name, inputs, config = body["method"], body.get("inputs"), body.get("config") or {}
        if name in SAE_METHODS and self.sae_root is None:
            raise HTTPError(403, f"{name} reads SAE folders: start the app with --sae-dir DIR (the folder that "
                                 "holds them).")
        if name not in self.methods:
            raise HTTPError(404, f"No method {name!r} in the app; it serves {', '.join(sorted(self.methods))}.")
        if not isinstance(config, dict):
            raise HTTPError(400, "config must be a JSON object of the method's fields.")
        files = [f for f in _file_fields(self.methods[name]) if config.get(f) is not None]
        if files:
            raise HTTPError(403, f"The app reads no files: leave out {', '.join(files)} (use the command line).")
        self._check_sizes(config)
        key = json.dumps([name, inputs, config], sort_keys=True)
        if self.methods[name].input_kind == "sae":
            inputs = self._sae_inputs(name, inputs)
        else:
            self._check_prompts(inputs)
        job = Job(job_id if job_id is not None else uuid.uuid4().hex, name, inputs, config, key, t0)
        with self._state:
            job.hit = self._cache.get(key)
            if job.hit is not None:
                self._cache.move_to_end(key)
                job.state = "done"
            elif self.waiting >= self.max_queue:
                raise HTTPError(503, f"{self.waiting} jobs are waiting for the model; try again shortly.")
            else:
                self.waiting += 1
                job.seq = next(self._seq)
            self._jobs[job.id] = job
            if len(self._jobs) > self.max_jobs:  # forget the oldest finished jobs
                for old in [k for k, j in self._jobs.items() if j.state in ("done", "error")][:len(self._jobs) -
                                                                                              self.max_jobs]:
                    del self._jobs[old]
        return job

    def work(self, job: Job) -> dict:
        """Compute a submitted job under the model's lock (or take its cached answer):
        ``{"result": Result JSON, "meta": {...}}``."""
        cached = job.hit is not None
        queue_ms = compute_ms = 0.0
        if not cached:
            try:
                with self.lock:
                    job.t_start = time.perf_counter()
                    job.state = "running"
                    queue_ms = (job.t_start - job.t0) * 1e3
                    with self._state:
                        job.hit = self._cache.get(job.key)
                    if job.hit is None:
                        with self.memo:  # a forward this prompt already ran is read, not run again
                            job.hit = specs.run_json(self.model, job.method, job.inputs, job.config).to_dict()
                    compute_ms = (time.perf_counter() - job.t_start) * 1e3
            except BaseException:
                job.state = "error"
                raise
            finally:
                job.t_end = time.perf_counter()
                with self._state:
                    self.waiting -= 1
            with self._state:
                self._cache[job.key] = job.hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        job.state = "done"
        meta = {"latency_ms": round((time.perf_counter() - job.t0) * 1e3, 2), "queue_ms": round(queue_ms, 2),
                "compute_ms": round(compute_ms, 2), "cached": cached, "job": job.id}
        return {"result": job.hit, "meta": meta}

    def run(self, body: Any, job_id: str | None = None) -> dict:
        """``{"method", "inputs", "config"}`` -> ``{"result": Result JSON, "meta": {...}}`` in this thread."""
        return self.work(self.submit(body, job_id))

    def job_status(self, job_id: str) -> dict:
        """Where a job stands: its state, its place in the queue (1: next to run, 0: running or done), the
        seconds since it was sent and since it started, and the progress bars the library shows while it runs."""
        with self._state:
            job = self._jobs.get(job_id)
            if job is None:
                raise HTTPError(404, f"No job {job_id!r} (jobs are kept for the last {self.max_jobs} calls).")
            ahead = sum(1 for j in self._jobs.values() if j.state == "queued" and j.seq < job.seq)
        now = time.perf_counter()
        end = job.t_end if job.t_end is not None else now
        doc = {"id": job.id, "method": job.method, "state": job.state,
               "position": ahead + 1 if job.state == "queued" else 0,
               "elapsed_s": round(end - job.t0, 3),
               "running_s": None if job.t_start is None else round(end - job.t_start, 3), "bars": []}
        if job.state == "running":
            doc["bars"] = progress_bars()
        return doc


@dataclass
class Job:
    """One API call: queued, running, done or error (``hit``: its answer)."""

    id: str
    method: str
    inputs: Any
    config: dict
    key: str
    t0: float
    state: str = "queued"
    seq: int = 0
    hit: dict | None = None
    t_start: float | None = None
    t_end: float | None = None


def progress_bars() -> list[dict]:
    """The library's live progress bars (tqdm) in this process: description, count, total."""
    from tqdm import tqdm

    with tqdm.get_lock():
        bars = list(getattr(tqdm, "_instances", ()))
    return [{"desc": b.desc or "", "n": int(b.n), "total": None if b.total is None else int(b.total)}
            for b in bars if not getattr(b, "disable", False)]


def _static(name: str) -> tuple[bytes, str]:
    folder = resources.files("lmscope.app") / "static"
    names = {p.name for p in folder.iterdir()}
    if name == "" or name == "index.html":
        name = "index.html"
    if name not in names or "/" in name:
        raise HTTPError(404, f"No file {name!r}.")
    suffix = name[name.rfind("."):]
    return (folder / name).read_bytes(), STATIC_TYPES.get(suffix, "application/octet-stream")


