"""Feature dashboards: what makes a latent fire, how often, and which tokens its decoder direction promotes.

* :func:`top_activations` streams token contexts through the model and the SAE and keeps, for every latent,
  its ``k`` largest activations (context index, position, value) and its firing density (first position of
  each context excluded, like the store and the evaluation).
* :func:`decoder_logits` projects each latent's decoder direction into the residual stream (through W_O for
  ``attn.z`` sites, through the down projection for ``mlp.post``) and then through the unembedding W_U — the
  direct "logit weights" shown in SAE dashboards (no final norm); the largest entries are the promoted tokens,
  the smallest the suppressed ones.
* :func:`feature_report` combines both into a :class:`~lmscope.results.Result` over (latent, rank) with the
  contexts (activating token marked ``«like this»``) and token lists in ``meta``; :func:`features_html` renders it.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmscope.errors import InputError
from lmscope.results import Axis, Result, atomic_write_bytes
from lmscope.sae.base import SAE
from lmscope.sae.io import check_fits


@torch.no_grad()
def top_activations(sae: SAE, model, contexts: torch.Tensor, *, k: int = 10, batch_size: int = 8,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every latent its k largest activations over ``contexts`` (N, T).

    Returns ``values (F, k)``, ``context_index (F, k)``, ``position (F, k)`` (index -1 where fewer than k
    activations were positive) and ``density (F,)``.
    """
    site = check_fits(sae, model)
    n_lat = sae.cfg.d_sae
    T = contexts.shape[1]
    best_v = torch.full((k, n_lat), float("-inf"))
    best_i = torch.full((k, n_lat), -1, dtype=torch.long)
    fires = torch.zeros(n_lat, dtype=torch.long)
    n_tok = 0
    for start in tqdm(range(0, len(contexts), batch_size), desc="feature activations", disable=not progress):
        ids = contexts[start:start + batch_size]
        act = model.run(ids, cache=[site.name], logits="none")[site.name]
        f = sae.encode(act.reshape(*act.shape[:2], -1).float()[:, 1:]).cpu()      # (B, T-1, F)
        flat = f.reshape(-1, n_lat)
        fires += (flat > 0).sum(0)
        n_tok += flat.shape[0]
        rows = torch.arange(flat.shape[0])
        gidx = (start + rows // (T - 1)) * T + rows % (T - 1) + 1                   # flat (context, position)
        kk = min(k, flat.shape[0])
        v, i = flat.topk(kk, dim=0)
        cat_v, cat_i = torch.cat([best_v, v]), torch.cat([best_i, gidx[i]])
        top_v, sel = cat_v.topk(k, dim=0)
        best_v, best_i = top_v, cat_i.gather(0, sel)
    keep = best_v > 0
    best_i = torch.where(keep, best_i, -1)
    best_v = torch.where(keep, best_v, 0.0)
    return best_v.T.contiguous(), (best_i // T).T.contiguous().where(keep.T, -1), \
        (best_i % T).T.contiguous().where(keep.T, -1), fires.double() / max(n_tok, 1)


def residual_directions(sae: SAE, model, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Each latent's decoder direction as a residual-stream write (L, D) (scale folded in)."""
    site = check_fits(sae, model)
    W = sae.W_dec.detach() / sae.scale
    if latents is not None:
        W = W[latents]
    if site.kind == "attn.z":
        sp = model.spec
        return torch.einsum("lhd,hde->le", W.reshape(len(W), sp.n_heads, sp.d_head), model.W_O(site.layer).float())
    if site.kind == "mlp.post":
        return W @ model.W_out(site.layer).float()
    if site.kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "embed"):
        return W
    raise InputError(f"Decoder directions of an SAE on {site.name} do not map to the residual stream; use an SAE "
                     "on resid_*, attn_out, mlp_out, attn.z or mlp.post.")


@torch.no_grad()
def decoder_logits(sae: SAE, model, latents: torch.Tensor, k: int = 10) -> tuple[list, list]:
    """Promoted and suppressed tokens of each latent: lists of [(token, weight), ...] per latent."""
    logits = residual_directions(sae, model, latents) @ model.W_U.float()
    promoted, suppressed = [], []
    for row in logits:
        hi, lo = row.topk(k), row.topk(k, largest=False)
        promoted.append([(model.decode([int(t)]), round(float(v), 4)) for v, t in zip(hi.values, hi.indices)])
        suppressed.append([(model.decode([int(t)]), round(float(v), 4)) for v, t in zip(lo.values, lo.indices)])
    return promoted, suppressed


def _context_text(model, ids: torch.Tensor, pos: int, before: int = 12, after: int = 4) -> str:
    lo, hi = max(0, pos - before), min(len(ids), pos + after + 1)
    parts = [model.decode([int(t)]) for t in ids[lo:hi]]
    parts[pos - lo] = f"«{parts[pos - lo]}»"
    return "".join(parts).replace("\n", "⏎")


def feature_report(sae: SAE, model, contexts: torch.Tensor, *, latents=None, k: int = 10, n_tokens: int = 10,
                   batch_size: int = 8, progress: bool = False) -> Result:
    """Dashboards for ``latents`` (default: the 20 densest live latents): top contexts, density, logit weights."""
    values, ctx_i, pos, density = top_activations(sae, model, contexts, k=k, batch_size=batch_size, progress=progress)
    if latents is None:
        order = density.argsort(descending=True)
        latents = order[density[order] > 0][:20]
    latents = torch.as_tensor(latents, dtype=torch.long).flatten()
    if latents.numel() == 0:
        raise InputError("No latents to report on: none fired on these contexts (or the list is empty).")
    if int(latents.max()) >= sae.cfg.d_sae or int(latents.min()) < 0:
        raise InputError(f"Latent indices must be in 0..{sae.cfg.d_sae - 1}.")
    promoted, suppressed = decoder_logits(sae, model, latents, n_tokens)
    feats = []
    for j, lat in enumerate(latents.tolist()):
        ctxs = [{"text": _context_text(model, contexts[c], p), "value": round(float(v), 4), "context": c,
                 "position": p}
                for v, c, p in zip(values[lat].tolist(), ctx_i[lat].tolist(), pos[lat].tolist()) if c >= 0]
        feats.append({"latent": lat, "density": float(density[lat]), "contexts": ctxs,
                      "promoted": promoted[j], "suppressed": suppressed[j]})
    return Result(values[latents], (Axis("latent", [str(i) for i in latents.tolist()]),
                                    Axis("rank", [str(i) for i in range(k)])),
                  method="sae_features", model=model.name,
                  params={"site": sae.cfg.site, "arch": sae.cfg.arch, "k": k, "contexts": int(len(contexts))},
                  extras={"density": density[latents].float(), "context_index": ctx_i[latents],
                          "position": pos[latents]},
                  meta={"features": feats})


def features_html(report: Result, path: str | os.PathLike) -> Path:
    """A self-contained HTML page with one card per latent."""
    cards = []
    for f in report.meta["features"]:
        rows = "".join(f"<tr><td>{c['value']:.3f}</td><td><code>{_mark(c['text'])}</code></td></tr>"
                       for c in f["contexts"])
        prom = ", ".join(f"{html.escape(repr(t))} {w:+.2f}" for t, w in f["promoted"])
        supp = ", ".join(f"{html.escape(repr(t))} {w:+.2f}" for t, w in f["suppressed"])
        cards.append(f"<div class='card'><h3>latent {f['latent']}</h3><p>density {f['density']:.2e}</p>"
                     f"<p><b>promotes</b> {prom}</p><p><b>suppresses</b> {supp}</p>"
                     f"<table><tr><th>act</th><th>context</th></tr>{rows}</table></div>")
    page = ("<!doctype html><meta charset='utf-8'><title>SAE features</title><style>body{font-family:sans-serif}"
            ".card{border:1px solid #ccc;margin:8px;padding:8px}mark{background:#fc6}td{padding:2px 6px}</style>"
            f"<h1>SAE features: {html.escape(report.params['arch'])} on {html.escape(report.params['site'])} "
            f"({html.escape(report.model)})</h1>" + "".join(cards))
    return atomic_write_bytes(path, page.encode())


def _mark(text: str) -> str:
    esc = html.escape(text)
    return esc.replace("«", "<mark>").replace("»", "</mark>")


