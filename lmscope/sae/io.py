"""SAELens-compatible files: a folder with ``cfg.json`` and ``sae_weights.safetensors``.

Tensor names and shapes are SAELens's (``W_enc (d_in, d_sae)``, ``W_dec (d_sae, d_in)``, ``b_enc``, ``b_dec``;
Gated: ``b_gate``, ``r_mag``, ``b_mag`` and no ``b_enc``; JumpReLU: ``threshold``). ``cfg.json`` has SAELens's
keys (``architecture`` standard|gated|topk|jumprelu, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, ``k`` for TopK, and ``metadata`` with ``model_name`` and a
TransformerLens-style ``hook_name``), plus lmscope's own config under ``metadata.lmscope``. Files are written
with the input scale folded into the weights (``normalize_activations: "none"``), so they take raw activations.
Writes are atomic: a failed save never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lmscope.errors import InputError
from lmscope.results import atomic_write_bytes
from lmscope.sae.base import SAE
from lmscope.sae.gated import GatedConfig, GatedSAE
from lmscope.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from lmscope.sae.relu import ReLUConfig, ReLUSAE
from lmscope.sae.topk import TopKConfig, TopKSAE
from lmscope.sites import KINDS, Site, parse_site, tl_name

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHS = {"relu": (ReLUConfig, ReLUSAE), "gated": (GatedConfig, GatedSAE), "topk": (TopKConfig, TopKSAE),
         "jumprelu": (JumpReLUConfig, JumpReLUSAE)}
_TO_SAELENS = {"relu": "standard", "gated": "gated", "topk": "topk", "jumprelu": "jumprelu"}
_FROM_SAELENS = {v: k for k, v in _TO_SAELENS.items()}
_NOT_SAE_KINDS = ("attn.pattern", "logits", "final.scale", "attn.head_out")  # SAEs read residual-like sites


def make_sae(arch: str, **fields) -> SAE:
    """Build an SAE of architecture ``arch`` (relu|gated|topk|jumprelu) from config fields."""
    if arch not in ARCHS:
        raise InputError(f"Unknown SAE architecture {arch!r}; use one of {', '.join(ARCHS)}.")
    cfg_cls, sae_cls = ARCHS[arch]
    return sae_cls(cfg_cls(**fields))


def tl_hook_name(site: str) -> str:
    """TransformerLens-style hook name of an lmscope site (``blocks.3.attn.z`` -> ``blocks.3.attn.hook_z``)."""
    return tl_name(parse_site(site))


def save_sae(sae: SAE, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``sae`` to folder ``path`` in SAELens's layout (scale folded in); returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    folded = copy.deepcopy(sae).float().cpu()
    folded.fold_scale()
    tensors = {"W_enc": folded.W_enc, "W_dec": folded.W_dec, "b_dec": folded.b_dec, **folded.extra_tensors()}
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    c = sae.cfg
    site = parse_site(c.site) if c.site else None
    cfg = {
        "architecture": _TO_SAELENS[c.arch], "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "hook_z" if site is not None and site.kind == "attn.z" else "none",
        "metadata": {"model_name": c.model, "hook_name": tl_hook_name(c.site) if c.site else "",
                     "hook_head_index": None, "prepend_bos": False,
                     "lmscope": {"config": c.to_dict(), **(extra or {})}},
    }
    if c.arch == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    atomic_write_bytes(folder / WEIGHTS_FILE, save(tensors))
    atomic_write_bytes(folder / CFG_FILE, json.dumps(cfg, indent=1).encode())
    return folder


def _bad(folder: Path, problem: str) -> InputError:
    return InputError(f"{folder} is not a readable SAE folder: {problem}. It needs {CFG_FILE} and {WEIGHTS_FILE} "
                      "as written by lmscope.sae.save_sae or SAELens's save_model; re-save or re-train it.")


def load_sae(path: str | os.PathLike) -> SAE:
    """Load an SAE folder written here or by SAELens (standard, gated, topk, jumprelu)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise _bad(folder, "it is a file, not a folder")
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except FileNotFoundError:
        raise _bad(folder, f"{CFG_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(folder, f"{CFG_FILE} is not valid JSON ({err})") from None
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except FileNotFoundError:
        raise _bad(folder, f"{WEIGHTS_FILE} is missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise _bad(folder, f"{WEIGHTS_FILE} is corrupted ({err})") from None
    arch = _FROM_SAELENS.get(cfg.get("architecture"))
    if arch is None:
        raise _bad(folder, f"architecture {cfg.get('architecture')!r} is not one of {list(_FROM_SAELENS)}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise InputError(f"{folder}: normalize_activations={cfg['normalize_activations']!r} is not supported; fold "
                         "the normalisation into the weights in SAELens first (normalize_activations='none').")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise InputError(f"{folder}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder norms "
                         "into the encoder in SAELens first (sae.fold_W_dec_norm(), then save_model).")
    meta = cfg.get("metadata") or {}
    ours = (meta.get("lmscope") or {}).get("config", {})
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    site = ours.get("site") or (parse_site(hook).name if hook else "")
    fields = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]), "site": site,
              "model": ours.get("model") or meta.get("model_name") or cfg.get("model_name") or "",
              "d_head": int(ours.get("d_head", 0))}
    cfg_cls, _ = ARCHS[arch]
    for name in (f.name for f in dataclasses.fields(cfg_cls)):
        if name in ours and name not in fields:
            fields[name] = ours[name]
    if arch == "topk":
        fields["k"] = int(cfg.get("k", ours.get("k", 32)))
    if arch == "relu" and not ours:
        fields["decoder"] = "unit_norm" if cfg.get("apply_b_dec_to_input", True) else "weighted"
    sae = make_sae(arch, **fields)
    # SAELens lets every architecture subtract b_dec or not (its JumpReLU default subtracts it; ours does not):
    # the file decides, so the loaded SAE computes exactly what was saved.
    sae.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", sae.apply_b_dec_to_input))
    _fill(sae, tensors, folder)
    return sae


def _fill(sae: SAE, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    want = {"W_enc": (sae.cfg.d_in, sae.cfg.d_sae), "W_dec": (sae.cfg.d_sae, sae.cfg.d_in), "b_dec": (sae.cfg.d_in,)}
    want.update({k: tuple(v.shape) for k, v in sae.extra_tensors().items()})
    for name, shape in want.items():
        if name not in tensors:
            raise _bad(folder, f"tensor {name!r} is missing (found {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise _bad(folder, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    with torch.no_grad():
        for name in want:
            t = tensors[name].float()
            if not torch.isfinite(t).all():
                raise _bad(folder, f"tensor {name!r} has non-finite values")
            if name == "threshold":
                sae.log_threshold.copy_(t.clamp_min(1e-12).log())
            else:
                getattr(sae, name).copy_(t)


def check_fits(sae: SAE, model, site: str | Site | None = None) -> Site:
    """Check that ``sae`` reads activations of ``model`` at ``site`` (default: the SAE's own site)."""
    s = parse_site(site or sae.cfg.site, model.spec.n_layers)
    model.require([s], f"An SAE on {s.name}")
    width = KINDS[s.kind].width(model.spec)
    if s.kind in _NOT_SAE_KINDS:
        raise InputError(f"SAEs read residual-like sites; {s.name} is not one. Use resid_*, attn.z, attn_out, "
                         "mlp_out or mlp.post.")
    if width != sae.cfg.d_in:
        raise InputError(f"The SAE reads {sae.cfg.d_in}-wide activations but {s.name} of {model.name} is "
                         f"{width} wide. Use an SAE trained on this model and site (it was trained on "
                         f"{sae.cfg.model or '?'} {sae.cfg.site or '?'}).")
    return s


