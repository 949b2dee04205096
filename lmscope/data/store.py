"""A disk-backed activation store: harvest one site's activations into safetensors shards.

:func:`harvest` runs the model over token contexts, records one site (for example
``blocks.15.resid_post``, or ``blocks.3.attn.z`` with heads flattened to H*dh), and writes the
vectors at real token positions -- padding skipped, the first position of each context left out
unless ``keep_first=True`` (BOS/first-token activations have outsized norms) -- into shards of
about ``shard_tokens`` vectors. The forward stops after the block that produces the site.

Each shard is written to a temporary file, synced and renamed, then listed in ``manifest.json``
with its sha256 and size (the manifest is replaced atomically too). A harvest that is killed
resumes from the last listed shard when called again with the same arguments, and ends with the
same shards as an uninterrupted run: shard i always covers the same contexts.

:class:`ActivationStore` reads a finished store: ``batches()`` streams shuffled (batch, d) float
tensors shard by shard through a bounded shuffle buffer, never holding the whole store in RAM;
every shard is checked against its checksum when read, and ``verify()`` checks all of them.

Layout: ``out_dir/manifest.json`` and ``out_dir/shard_00000.safetensors`` (tensor ``acts``, (n, d)).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from lmscope.errors import InputError, LmscopeError
from lmscope.sites import KINDS, parse_site

FORMAT = "lmscope-activations/1"
MANIFEST = "manifest.json"
_NOT_TOKEN_SITES = tuple(k.name for k in KINDS.values() if not k.per_token)  # attn.pattern


class StoreError(LmscopeError):
    """An activation store that is corrupted, incomplete, or does not match the requested harvest."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


# ---------------------------------------------------------------------- reading
class ActivationStore:
    """A finished harvest on disk. ``len(store)`` vectors of width ``store.d`` from ``store.site``."""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.exists():
            raise StoreError(f"{self.path} is not an activation store (no {MANIFEST}); create one with "
                             "lmscope.data.harvest(...).")
        try:
            self.manifest: dict = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{manifest} is not valid JSON ({err}); the store is damaged, harvest it again.") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest} has format {self.manifest.get('format')!r}, expected {FORMAT!r}.")
        if not self.manifest["complete"] and not allow_incomplete:
            done = sum(s["rows"] for s in self.manifest["shards"])
            raise StoreError(f"The harvest in {self.path} is incomplete ({done} of {self.manifest['n_tokens']} "
                             "vectors); call harvest(...) again with the same arguments to resume it.")

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def site(self) -> str:
        return self.manifest["site"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, site={self.site!r}, model={self.model!r}, n={len(self)}, "
                f"d={self.d})")

    def load_shard(self, i: int, *, verify: bool = True) -> torch.Tensor:
        """Shard i as an (n_i, d) tensor in the stored dtype; checked against its checksum first."""
        entry = self.shards[i]
        path = self.path / entry["file"]
        if not path.exists():
            raise StoreError(f"Shard {entry['file']} of {self.path} is missing; harvest the store again.")
        data = path.read_bytes()
        if verify:
            if len(data) != entry["bytes"]:
                raise StoreError(f"Shard {entry['file']} of {self.path} is truncated or altered: {len(data)} bytes, "
                                 f"expected {entry['bytes']}. Delete the store and harvest it again.")
            if _sha256(data) != entry["sha256"]:
                raise StoreError(f"Shard {entry['file']} of {self.path} is corrupted: its sha256 does not match "
                                 "the manifest. Delete the store and harvest it again.")
        try:
            acts = st_load(data)["acts"]
        except Exception as err:  # noqa: BLE001 - safetensors raises several kinds on damaged files
            raise StoreError(f"Shard {entry['file']} of {self.path} cannot be read ({err}).") from None
        if acts.shape != (entry["rows"], self.d):
            raise StoreError(f"Shard {entry['file']} of {self.path} has shape {tuple(acts.shape)}, expected "
                             f"({entry['rows']}, {self.d}).")
        return acts

    def verify(self) -> None:
        """Check every shard's size and sha256 against the manifest; raise StoreError naming a bad shard."""
        for i in range(len(self.shards)):
            self.load_shard(i, verify=True)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, epochs: int = 1, *,
                drop_last: bool = False, buffer_shards: int = 4, dtype: torch.dtype = torch.float32,
                verify: bool = True) -> Iterator[torch.Tensor]:
        """Stream (batch_size, d) tensors, shard by shard, for ``epochs`` passes.

        With ``shuffle``, the shard order is permuted per epoch and rows are mixed within a buffer
        of ``buffer_shards`` shards (plus the remainder of the previous buffer), so memory stays at
        a few shards. The same seed gives the same batches. The last batch of an epoch may be
        smaller unless ``drop_last``.
        """
        if batch_size < 1 or epochs < 1 or buffer_shards < 1:
            raise InputError("batch_size, epochs and buffer_shards must be positive.")
        n = len(self.shards)
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
            rest = torch.empty(0, self.d, dtype=dtype)
            for start in range(0, n, buffer_shards):
                parts = [rest] + [self.load_shard(i, verify=verify).to(dtype)
                                  for i in order[start:start + buffer_shards]]
                buf = torch.cat(parts)
                if shuffle:
                    buf = buf[torch.randperm(len(buf), generator=gen)]
                full = len(buf) // batch_size * batch_size
                yield from buf[:full].split(batch_size)
                rest = buf[full:]
            if len(rest) and not drop_last:
                yield rest


# ---------------------------------------------------------------------- harvesting
def _as_contexts(model, contexts, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(contexts, (list, tuple)) and contexts and all(isinstance(c, str) for c in contexts):
        batch = model.encode(list(contexts), padding_side="right")
        return batch.input_ids, batch.attention_mask
    if not isinstance(contexts, torch.Tensor) or contexts.ndim != 2 or contexts.dtype not in (torch.long, torch.int):
        raise InputError("contexts must be a (N, T) integer tensor of token ids (see token_contexts) or a list of "
                         "strings.")
    ids = contexts.long()
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        if attention_mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, contexts {tuple(ids.shape)}.")
        mask = attention_mask.long()
    if ids.numel() == 0:
        raise InputError("contexts is empty.")
    if int(ids.max()) >= model.spec.d_vocab or int(ids.min()) < 0:
        raise InputError(f"contexts hold token ids outside {model.name}'s vocabulary (0..{model.spec.d_vocab - 1}); "
                         "were they made with another tokenizer?")
    return ids, mask


def _keep_positions(mask: torch.Tensor, keep_first: bool) -> torch.Tensor:
    keep = mask.bool().clone()
    if not keep_first:
        first = keep.long().argmax(dim=1)
        keep[torch.arange(len(keep)), first] = False
    return keep


def _site_width(model, site) -> int:
    return KINDS[site.kind].width(model.spec)


def site_activations(model, site: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One site's activations for a batch of contexts, flattened to (B, T, width); the forward stops early."""
    from lmscope.models import Batch

    pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = Batch(ids, mask, pos, [[] for _ in range(len(ids))], "right")
    x = model.run_until(batch, parse_site(site, model.spec.n_layers))
    return x.reshape(x.shape[0], x.shape[1], -1)


def harvest(model, site: str, contexts: torch.Tensor | Sequence[str], out_dir: str | Path, *,
            n_tokens: int | None = None, batch_size: int = 16, shard_tokens: int = 32768, keep_first: bool = False,
            attention_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
            progress: bool = True) -> ActivationStore:
    """Record ``site`` over ``contexts`` into a resumable sharded store in ``out_dir``.

    ``contexts``: a (N, T) LongTensor (from :func:`token_contexts`) with an optional (N, T)
    ``attention_mask`` (0 = padding, skipped), or a list of strings (right-padded). ``n_tokens``
    caps the number of stored vectors (default: every kept position). Calling it again on a
    partly written ``out_dir`` with the same arguments resumes; different arguments raise a
    StoreError and touch nothing. Returns the finished :class:`ActivationStore`.
    """
    site_ = parse_site(site, model.spec.n_layers)
    model.require([site_], f"Harvesting {site_.name}")
    if site_.kind in _NOT_TOKEN_SITES:
        raise InputError(f"Site {site_.name!r} is not one vector per token; harvest a token site (resid_post, "
                         "attn.z, mlp.post, ...).")
    if batch_size < 1 or shard_tokens < 1:
        raise InputError("batch_size and shard_tokens must be positive.")
    ids, mask = _as_contexts(model, contexts, attention_mask)
    keep = _keep_positions(mask, keep_first)
    per_context = keep.sum(dim=1)
    available = int(per_context.sum())
    if n_tokens is None:
        n_tokens = available
    if not 0 < n_tokens <= available:
        raise InputError(f"n_tokens={n_tokens}, but the contexts give {available} vectors (first positions "
                         f"{'kept' if keep_first else 'left out'}, padding skipped); give more contexts or fewer "
                         "tokens.")
    # contexts needed to reach n_tokens, and a fixed number of contexts per shard
    n_ctx = int((per_context.cumsum(0) < n_tokens).sum()) + 1
    per_shard = max(1, shard_tokens // max(1, int(per_context.max())))
    digest = hashlib.sha256(ids[:n_ctx].numpy().tobytes() + mask[:n_ctx].numpy().tobytes()).hexdigest()
    config = {"format": FORMAT, "model": model.name, "site": site_.name, "d": _site_width(model, site_),
              "dtype": str(dtype).removeprefix("torch."), "n_tokens": n_tokens, "context": ids.shape[1],
              "n_contexts": n_ctx, "contexts_sha256": digest, "keep_first": keep_first,
              "contexts_per_shard": per_shard, "shard_tokens": shard_tokens,
              "spec": {"n_layers": model.spec.n_layers, "d_model": model.spec.d_model}}
    out = Path(out_dir)
    manifest = _open_manifest(out, config)
    if manifest["complete"]:
        return ActivationStore(out)
    store = ActivationStore(out, allow_incomplete=True)
    store.verify()  # a damaged earlier shard stops the resume here, before anything is written
    done = len(manifest["shards"])
    total = sum(s["rows"] for s in manifest["shards"])
    n_shards = (n_ctx + per_shard - 1) // per_shard
    bar = tqdm(total=n_tokens, initial=total, unit="tok", desc=f"harvest {site_.name}", disable=not progress)
    for i in range(done, n_shards):
        lo, hi = i * per_shard, min((i + 1) * per_shard, n_ctx)
        parts = []
        for b in range(lo, hi, batch_size):
            e = min(b + batch_size, hi)
            x = site_activations(model, site_.name, ids[b:e], mask[b:e])
            parts.append(x[keep[b:e]].to(dtype).cpu())
        acts = torch.cat(parts)[: n_tokens - total].contiguous()
        data = st_save({"acts": acts})  # no metadata: its JSON key order varies between processes
        name = _shard_name(i)
        _write_atomic(out / name, data)
        manifest["shards"].append({"file": name, "rows": len(acts), "bytes": len(data), "sha256": _sha256(data),
                                   "contexts": [lo, hi]})
        total += len(acts)
        manifest["complete"] = i == n_shards - 1
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
        bar.update(len(acts))
    bar.close()
    return ActivationStore(out)


def _open_manifest(out: Path, config: dict) -> dict:
    """The manifest of a harvest in ``out``: a new one, or the existing one if it matches ``config``."""
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{path} is not valid JSON ({err}); the store is damaged. Harvest into a new folder.")
        diff = [k for k in config if manifest.get(k) != config[k]]
        if diff:
            raise StoreError(f"{out} holds a different harvest (it differs in {', '.join(diff)}); nothing was "
                             "changed. Use another out_dir, or delete this one to start again.")
        for stray in out.glob("*.tmp"):
            stray.unlink()
        return manifest
    if out.exists() and any(p for p in out.iterdir() if not p.name.endswith(".tmp")):
        raise StoreError(f"{out} is not empty and holds no {MANIFEST}; harvest into an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    for stray in out.glob("*.tmp"):
        stray.unlink()
    manifest = {**config, "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": []}
    _write_atomic(path, json.dumps(manifest, indent=1).encode())
    return manifest
