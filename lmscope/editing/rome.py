"""ROME: rank-one model editing (Meng, Bau, Andonian, Belinkov, NeurIPS 2022), with r-ROME's consistent key.

A memory matrix ``W`` (the MLP down projection by default; :meth:`Model.memory` names it from the
model's parts) is read as an associative memory ``v = W k``. To make the model say the new object o*
for a subject s (``"The Eiffel Tower is located in the city of"`` → ``" Rome"``):

1. **k\\***: the key at the last subject token, averaged over the bare prompt and over prompts led by
   short generated prefixes (10 of 5 tokens and 10 of 10 tokens by default).
2. **v\\* = W k\\* + δ**: δ is added to the matrix's output at the last subject token of every
   prompt and optimised with Adam on the NLL of o* (read at the last layer, i.e. the logits) over the
   prefixed prompts, plus ``kl_factor`` × the KL divergence from the unedited next-token distribution at
   the last subject token of ``"{subject} is a"`` (keeps the subject's essence), plus
   ``weight_decay``·‖δ‖/‖W k*‖²; ‖δ‖ is clamped to ``clamp``·‖W k*‖; stop early when the loss is
   under ``stop_loss``.
3. **Update**: ``W ← W + (v* − W k*) uᵀ / (uᵀ k*)`` with ``u = C⁻¹ k*`` and ``C = E[k kᵀ]`` over a
   corpus (:mod:`lmscope.editing.second_moment`). Then ``W' k* = v*`` exactly and every key x with
   ``uᵀx = 0`` maps as before.

r-ROME (Gupta et al. 2024): the original code builds ``u`` from the prefix-averaged key but the
residual from the bare prompt's key, and this inconsistency makes sequential edits collapse; here the
same averaged k* is used in both places (and v* is W k* + δ).

Use :func:`rome` to compute an :class:`~lmscope.editing.edit.Edit` (nothing is changed), then
``with model.edit(e):`` or ``handle = model.edit(e); ...; handle.undo()``.

Shapes: k (F,) keys, v (D,) values, W (D, F), C (F, F).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope.editing.edit import Edit
from lmscope.errors import InputError
from lmscope.models import Batch, Model


@dataclass(frozen=True)
class Fact:
    """A requested fact: ``prompt`` contains ``subject`` verbatim; ``target`` is the new object (with its
    leading space, e.g. ``" Rome"``; it may span several tokens)."""

    prompt: str
    subject: str
    target: str

    def __post_init__(self):
        if not self.subject.strip() or self.subject not in self.prompt:
            raise InputError(f"The subject {self.subject!r} must occur in the prompt {self.prompt!r} (as written "
                             "there: case and spaces matter).")
        if not self.target.strip():
            raise InputError("The target (new object) must be a non-empty text such as ' Rome'.")


@dataclass(frozen=True)
class RomeSettings:
    """v* optimisation and prefix settings (ROME's reference values for GPT-2 XL)."""

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    stop_loss: float = 5e-2
    prefixes: tuple[tuple[int, int], ...] = ((10, 5), (10, 10))  # (count, tokens)
    seed: int = 0
    ridge: float = 1e-6  # C + ridge·mean(diag C)·I, so that C is invertible from few tokens

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.clamp <= 0 or self.ridge < 0:
            raise InputError("steps ≥ 0, lr > 0, clamp > 0 and ridge ≥ 0 are required.")


# ------------------------------------------------------------------------------------------------ tokens
def _encode(model: Model, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def last_token_of(model: Model, text: str, start: int, end: int) -> int:
    """Index of the last token of ``text`` that overlaps characters ``start:end`` (the subject)."""
    _, offsets = _encode(model, text)
    pos = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not pos:
        raise InputError(f"The subject {text[start:end]!r} covers no token of {text!r}.")
    return pos[-1]


def target_ids(model: Model, target: str) -> list[int]:
    ids = model.tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"The target {target!r} tokenises to nothing.")
    return list(ids)


def pad_left(model: Model, rows: Sequence[Sequence[int]]) -> Batch:
    """A left-padded :class:`Batch` of token id rows."""
    t = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, t - len(r):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return Batch(ids, mask, pos, [[] for _ in rows], "left")


def context_prefixes(model: Model, prefixes: Sequence[tuple[int, int]] = ((10, 5), (10, 10)), seed: int = 0
                     ) -> tuple[str, ...]:
    """Short texts generated by the model (top-5 sampling, seeded) that lead the prefixed prompts."""
    starts = ["The", "Therefore", "Because", "I", "You"]
    out: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for count, length in prefixes:
            if count < 1 or length < 1:
                continue
            seeds = [starts[i % len(starts)] for i in range(count)]
            ids = model.sample(seeds, length, do_sample=True, top_k=5)
            for row in ids:
                text = model.tokenizer.decode(row, skip_special_tokens=True).replace("{", " ").replace("}", " ")
                out.append(" ".join(text.split()) or "The")
    return tuple(out)


def templates(model: Model, settings: RomeSettings, prefixes: Sequence[str] | None = None) -> tuple[str, ...]:
    """``"{}"`` and ``"<prefix>. {}"`` for every generated prefix."""
    if prefixes is None:
        prefixes = context_prefixes(model, settings.prefixes, settings.seed)
    return ("{}",) + tuple(p + ". {}" for p in prefixes)


def _rows(model: Model, fact: Fact, tmpls: Sequence[str], extra: Sequence[int] = ()
          ) -> tuple[list[list[int]], list[int]]:
    """Token rows of each template filled with the prompt (+ ``extra`` ids), and the last subject index."""
    rows, idx = [], []
    for tm in tmpls:
        text = tm.format(fact.prompt)
        start = text.rfind(fact.prompt) + fact.prompt.find(fact.subject)
        ids, _ = _encode(model, text)
        rows.append(ids + list(extra))
        idx.append(last_token_of(model, text, start, start + len(fact.subject)))
    return rows, idx


def _positions(batch: Batch, rows: Sequence[Sequence[int]], idx: Sequence[int]) -> list[int]:
    t = batch.input_ids.shape[1]
    return [t - len(r) + i for r, i in zip(rows, idx)]


# ------------------------------------------------------------------------------------------------ k*, v*
def compute_key(model: Model, fact: Fact, layer: int, tmpls: Sequence[str], kind: str | None = None) -> torch.Tensor:
    """k* (F,): the key at the last subject token, averaged over the templates."""
    mem = model.memory(layer, kind)
    rows, idx = _rows(model, fact, tmpls)
    batch = pad_left(model, rows)
    with torch.no_grad():
        keys = model.run(batch, cache=[mem.key_site], logits="none")[mem.key_site]
    pos = torch.tensor(_positions(batch, rows, idx))
    return keys[torch.arange(len(rows)), pos.to(keys.device)].float().mean(0).cpu()


def compute_value(model: Model, fact: Fact, layer: int, k_star: torch.Tensor, tmpls: Sequence[str],
                  settings: RomeSettings = RomeSettings(), kind: str | None = None) -> tuple[torch.Tensor, dict]:
    """(v* (D,), info): v* = W k* + δ, δ optimised as in the module docstring."""
    mem = model.memory(layer, kind)
    tgt = target_ids(model, fact.target)
    rows, idx = _rows(model, fact, tmpls, tgt[:-1])
    kl_fact = Fact(f"{fact.subject} is a", fact.subject, fact.target)
    kl_rows, kl_idx = _rows(model, kl_fact, ["{}"])
    all_rows = rows + kl_rows
    batch = pad_left(model, all_rows)
    t = batch.input_ids.shape[1]
    pos = _positions(batch, all_rows, idx + kl_idx)
    n, nt = len(rows), len(tgt)
    # rows end with the prompt + target[:-1], so the logits at position t-nt+j predict target token j
    pred_pos = torch.arange(t - nt, t)
    tgt_t = torch.tensor(tgt)
    kl_pos = torch.tensor(pos[n:])
    v_init = mem.weight() @ k_star
    scale = float(v_init.norm())
    with torch.no_grad():
        base = model.run(batch, logits="all").logits
        kl_init = torch.log_softmax(base[n + torch.arange(len(kl_rows)), kl_pos].float(), -1)
    delta = torch.zeros(mem.shape[0], device=model.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=settings.lr)
    info = {"steps": 0, "nll": [], "kl": []}
    for step in range(settings.steps):
        with mem.shifted(delta, range(len(all_rows)), pos):
            logits = model.run(batch, logits="all", grad=True).logits
        logp = torch.log_softmax(logits[:n, pred_pos].float(), -1)  # (n, nt, V)
        nll = -logp.gather(-1, tgt_t.to(logp.device).expand(n, nt).unsqueeze(-1)).squeeze(-1).mean()
        kl_cur = torch.log_softmax(logits[n + torch.arange(len(kl_rows)), kl_pos].float(), -1)
        kl = torch.nn.functional.kl_div(kl_cur, kl_init.to(kl_cur.device), log_target=True, reduction="batchmean")
        loss = nll + settings.kl_factor * kl + settings.weight_decay * delta.norm() / scale ** 2
        info["nll"].append(nll.item())
        info["kl"].append(kl.item())
        if loss.item() < settings.stop_loss:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            cap = settings.clamp * scale
            if delta.norm() > cap:
                delta.mul_(cap / delta.norm())
        info["steps"] = step + 1
    d = delta.detach().float().cpu()
    info.update(delta_norm=float(d.norm()), v_init_norm=scale)
    return v_init + d, info


def rank_one_update(W_OI: torch.Tensor, C_II: torch.Tensor, k_I: torch.Tensor, v_O: torch.Tensor,
                    ridge: float = 0.0) -> torch.Tensor:
    """ΔW (D, F) with (W + ΔW) k = v that leaves every key x with (C⁻¹k)ᵀx = 0 unchanged (float64 solve)."""
    C = C_II.double()
    if ridge:
        C = C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)
    k = k_I.double()
    u = torch.linalg.solve(C, k)
    residual = v_O.double() - W_OI.double() @ k
    return (torch.outer(residual, u) / (u @ k)).float()


def rome(model: Model, fact: Fact, layer: int, C: torch.Tensor, *, settings: RomeSettings = RomeSettings(),
         prefixes: Sequence[str] | None = None, kind: str | None = None) -> Edit:
    """The ROME edit of ``fact`` at ``layer`` given the key moment ``C`` (F, F); the model is left unchanged."""
    tmpls = templates(model, settings, prefixes)
    mem = model.memory(layer, kind)
    if tuple(C.shape) != (mem.shape[1],) * 2:
        raise InputError(f"C has shape {tuple(C.shape)}; {mem.name} takes keys of width {mem.shape[1]}.")
    k = compute_key(model, fact, layer, tmpls, kind)
    v, info = compute_value(model, fact, layer, k, tmpls, settings, kind)
    delta = rank_one_update(mem.weight(), C, k, v, settings.ridge)
    return Edit.for_model(model, {mem.name: delta}, facts=[fact], meta={"method": "rome", "layer": mem.layer,
                                                                        **info})
