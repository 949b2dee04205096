"""Load-time checks: every site fires with the expected shape, the explicit attention path matches
the native kernel (RWKV: lmscope's time and channel mix match the native forward, and each time-mix write is
``output(r ⊙ wkv)``), the residual decomposition adds up to the model's own final residual, and the
read-out (final norm, unembedding, soft-cap) of that residual gives the model's own logits.

A pass is remembered per model fingerprint under ``$LMSCOPE_CACHE/checks/``: the identity of the
folder the weights were loaded from (file names, sizes and modification times), a sample of the
weights, dtype and device, and the versions of lmscope (with a digest of its model-layer source),
transformers and torch. A model with the same fingerprint skips the check; any change re-checks.
Models that were not loaded from a folder (built in memory) are always checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from lmscope.errors import ModelCheckError
from lmscope.models.decompose import decompose_cache, decomposition_sites
from lmscope.models.norms import apply_frozen_norm, norm_bias
from lmscope.models.ssm2 import out_proj_input
from lmscope.models.wkv import check_wkv_writes
from lmscope.sites import KINDS, site_names

if TYPE_CHECKING:
    from lmscope.models.model import Model

PROBE = "The quick brown fox jumps over the lazy dog"
DECOMPOSITION_RTOL = 1e-4
CHECKS_FOLDER = "checks"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def expected_shape(model: Model, kind: str, b: int, t: int) -> tuple[int, ...]:
    return KINDS[kind].shape(model.spec, b, t)


def all_sites(model: Model) -> list[str]:
    """Every site of the model: the global ones and each layer kind it has, over all layers."""
    sites = [k for k in model.site_kinds if not KINDS[k].layer]
    for kind in model.site_kinds:
        if KINDS[kind].layer:
            sites += site_names(kind, model.spec.n_layers)
    return sites


def check_at_load(model: Model) -> str:
    """Check ``model`` unless a pass with the same fingerprint is recorded: "cached" or "checked"."""
    from lmscope.models.loading import cache_dir

    key = fingerprint(model)
    record = None if key is None else cache_dir() / CHECKS_FOLDER / f"{key}.json"
    if record is not None and record.is_file():
        return "cached"
    check_model(model)
    if record is not None:
        _write_atomic(record, {"model": model.name, "fingerprint": key, "passed": True})
    return "checked"


def fingerprint(model: Model) -> str | None:
    """A digest of everything the check's outcome depends on; None when the weights have no folder."""
    folder = Path(str(getattr(model.hf.config, "_name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return None
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
            st = path.stat()
            h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(str(folder.resolve()).encode())
    with torch.no_grad():
        for name, p in model.hf.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.device.type}|".encode())
            h.update(sample.numpy().tobytes())
    h.update(f"{model.adapter.family}|{_versions()}".encode())
    return h.hexdigest()[:32]


def _versions() -> str:
    import lmscope

    root = Path(lmscope.__file__).parent
    src = hashlib.sha256()
    for path in sorted([*root.glob("models/**/*.py"), root / "sites.py", root / "interventions.py"]):
        src.update(path.read_bytes())
    return f"lmscope {lmscope.__version__} {src.hexdigest()[:16]}|transformers {transformers.__version__}|" \
           f"torch {torch.__version__}"


def _write_atomic(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next load a check
        pass


def check_model(model: Model) -> None:
    """Raise :class:`ModelCheckError` unless the model's sites and decomposition behave."""
    batch = model.encode(PROBE)
    b, t = batch.input_ids.shape
    with torch.no_grad():
        plain = model.forward(batch).logits.float()
        run = model.run(batch, cache=all_sites(model) + decomposition_sites(model), logits="all")
    for name, value in run.cache.items():
        if name.startswith("aux."):
            continue
        kind = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        want = expected_shape(model, kind, b, t)
        if tuple(value.shape) != want:
            raise ModelCheckError(f"{model.name}: site {name} has shape {tuple(value.shape)}, expected {want}.")
    missing = set(all_sites(model)) - set(run.cache)
    if missing:
        raise ModelCheckError(f"{model.name}: sites never fired: {sorted(missing)[:5]}.")
    err = (run.logits.float() - plain).abs().max().item()
    if err > 1e-3 * max(1.0, plain.abs().max().item()):
        what = "the explicit state-space mixer" if "ssm" in model.parts else \
            "lmscope's time-mix and channel-mix path" if "wkv" in model.parts else "explicitly computed attention"
        raise ModelCheckError(
            f"{model.name}: {what} changes the logits by {err:.2e}; "
            "the attention mask or the adapter's mixer path is wrong."
        )
    if "ssm" in model.parts:
        check_ssm_writes(model, batch, run.cache)
    if "wkv" in model.parts:
        check_wkv_writes(model, batch, run.cache)
    dec = decompose_cache(model, run.batch, run.cache)
    total = dec.vectors.sum(dim=1)
    rel = ((total - dec.resid).norm() / dec.resid.norm()).item()
    if rel > DECOMPOSITION_RTOL:
        raise ModelCheckError(
            f"{model.name}: the component writes add up to the final residual only within {rel:.2e} "
            f"(relative), above {DECOMPOSITION_RTOL}; the adapter misses a write."
        )
    final = model.final_norm
    with torch.no_grad():
        native = final(dec.resid.to(model.device).to(final.weight.dtype)).float().cpu()
    frozen = apply_frozen_norm(dec.resid, dec.scale, final, model.spec.norm).cpu()
    bias = norm_bias(final)
    if bias is not None:
        frozen = frozen + bias.cpu()
    if (native - frozen).abs().max().item() > 1e-3 * max(1.0, native.abs().max().item()):
        raise ModelCheckError(f"{model.name}: the final norm does not match its frozen-scale form.")
    own = plain.cpu()[torch.arange(b), dec.positions]
    err = (model.unembed(dec.resid) - own).abs().max().item()
    if err > 1e-3 * max(1.0, own.abs().max().item()):
        raise ModelCheckError(
            f"{model.name}: the final norm, unembedding and soft-cap ({model.logit_softcap}) of the final residual "
            f"miss the model's logits by {err:.2e}; the adapter names the wrong modules or soft-cap field."
        )


def check_ssm_writes(model: Model, batch, cache: dict) -> None:
    """Each state-space block's native write equals ``out_proj(s ⊙ SiLU(g))`` of the explicit path's s and g
    (Mamba-2: ``out_proj(norm(s ⊙ SiLU(g)))``, its gated norm)."""
    with torch.no_grad():
        native = model.run(batch, cache=site_names("ssm_out", model.spec.n_layers), logits="none").cache
        for layer in range(model.spec.n_layers):
            s, g = cache[f"blocks.{layer}.ssm.out"], cache[f"blocks.{layer}.ssm.gate"]
            write = model.ssm_out_proj(layer)(out_proj_input(model, layer, s, g))
            want = native[f"blocks.{layer}.ssm_out"]
            err = (write - want).abs().max().item()
            if err > 1e-3 * max(1.0, want.abs().max().item()):
                raise ModelCheckError(f"{model.name}: block {layer}'s write differs from out_proj(s ⊙ SiLU(g)) by "
                                      f"{err:.2e}; the adapter's state-space mixer paths are wrong.")
