"""The uncentred second moment ``C = E[k kᵀ]`` of a memory matrix's keys over a text corpus.

ROME (Meng et al. 2022) spreads a rank-one edit along ``C⁻¹k*``, so that keys the corpus makes
likely change least. C is the *uncentred* moment (not a covariance) of the matrix's input (for the
MLP down projection: ``mlp.post``), accumulated in float64 over every real token of fixed-length
contexts of the corpus (the first position of each context, the BOS token's outsized activations,
left out), and returned in float32. METHODS.md §14.1.

The forward stops at the edited block (:meth:`Model.run_until`). C is computed once per model,
matrix and corpus setting, and cached under ``$LMSCOPE_CACHE/editing/mom2/``. The running sum is
checkpointed every ``save_every`` batches (written to a temporary file and renamed), so a killed
computation resumes where it stopped when called again with the same arguments.

Shapes: keys (N, F); C (F, F).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmscope.data.corpus import token_contexts
from lmscope.errors import InputError
from lmscope.models import Model

FORMAT = "lmscope-mom2/1"


def cache_root() -> Path:
    """``$LMSCOPE_CACHE/editing`` (default ``~/.cache/lmscope/editing``)."""
    env = os.environ.get("LMSCOPE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lmscope") / "editing"


def weights_fingerprint(model: Model) -> str:
    """A short digest of the model's shape, embeddings, unembedding and final norm: what identifies the
    model an edit or a statistic belongs to (the memory matrices are left out, so that edits stack)."""
    h = hashlib.sha256()
    s = model.spec
    h.update(f"{s.family}|{s.n_layers}|{s.d_model}|{s.d_mlp}|{s.d_vocab}".encode())
    for w in (model.W_E[:256], model.W_U[:, :256], model.norm_weight("ln_final")):
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _save_atomic(path: Path, tensors: dict, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(meta)})
    os.replace(tmp, path)


def second_moment(model: Model, layer: int, *, kind: str | None = None, tokens: int = 1_000_000,
                  corpus: str = "default", context: int = 128, batch_size: int = 8, cache: bool = True,
                  save_every: int = 20, progress: bool = True) -> torch.Tensor:
    """``C = E[k kᵀ]`` (F, F) float32 of the keys of ``model.memory(layer, kind)`` over ``tokens`` corpus tokens."""
    if tokens < 1 or batch_size < 1 or save_every < 1:
        raise InputError("tokens, batch_size and save_every must be positive.")
    mem = model.memory(layer, kind)
    config = {"format": FORMAT, "model": model.name, "fingerprint": weights_fingerprint(model), "site": mem.key_site,
              "memory": mem.name, "tokens": tokens, "corpus": str(corpus), "context": context}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / "mom2" / f"{model.name.replace('/', '_')}-{mem.name}-{key}"
    final, partial = folder / "mom2.safetensors", folder / "partial.safetensors"
    if cache and final.is_file():
        return load_file(str(final))["mom2"]
    contexts = token_contexts(model, corpus, context, split="train", max_tokens=tokens)
    d_in = mem.shape[1]
    total, count, done = torch.zeros(d_in, d_in, dtype=torch.float64), 0, 0
    if cache and partial.is_file():
        state = load_file(str(partial))
        total, count, done = state["sum"], int(state["count"]), int(state["done"])
    starts = range(done, contexts.shape[0], batch_size)
    bar = tqdm(starts, desc=f"C of {mem.name} ({contexts.shape[0] * (context - 1)} keys)",
               disable=not progress or len(starts) < 2)
    with torch.no_grad():
        for i, start in enumerate(bar):
            ids = contexts[start:start + batch_size]
            keys = model.run_until(ids, mem.key_site)[:, 1:].reshape(-1, d_in).double().cpu()
            total += keys.T @ keys
            count += keys.shape[0]
            done = start + ids.shape[0]
            if cache and (i + 1) % save_every == 0 and done < contexts.shape[0]:
                _save_atomic(partial, {"sum": total, "count": torch.tensor(count), "done": torch.tensor(done)}, config)
    mom2 = (total / count).float()
    if cache:
        _save_atomic(final, {"mom2": mom2.contiguous()}, {**config, "count": count})
        partial.unlink(missing_ok=True)
    return mom2
