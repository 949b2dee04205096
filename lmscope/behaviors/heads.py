"""Head detectors: score every attention head (layer × head) for the canonical roles of the circuits literature.

Each role is a number in a fixed range per head, measured on a probe whose answer is known:

* **previous_token** (Elhage et al. 2021): mean attention A[i, i−1] on random tokens.
* **duplicate_token**: on ``[BOS] R R`` (R uniform random tokens, n long), the attention mass of a
  second-copy position on earlier positions that hold the *same* token (the diagonal excluded).
* **induction** (prefix matching, Olsson et al. 2022): on ``[BOS] R R``, the mass of a second-copy position
  on the positions right *after* earlier occurrences of its token (A[i, i−n+1]); chance is about 1/i.
* **copying** (Olsson et al.): the eigenvalue score Σ Re λ / Σ |λ| ∈ [−1, 1] of the head's full OV circuit
  ``W_E N1 W_V W_O N_f W_U`` (N1, N_f the attention-input and final norms with their scale frozen at 1;
  computed on the equivalent dh × dh matrix). Near 1: the head copies what it attends to.
* **copy_suppression** (McDougall et al. 2023): ``attend_predicted × ov_suppression``, where
  ``attend_predicted`` is the attention a position pays, in natural text, to earlier occurrences of the token
  the model itself predicts there, and ``ov_suppression`` the fraction of probe tokens whose own logit is in
  the bottom 5 % of the head's OV read-out (effective embeddings, below). Both are reported as roles too.
* **successor** (Gould et al. 2024): the fraction of ordinal pairs (numbers, number words, days, months,
  letters) whose successor is the top logit, among the tokens of the same sequence, when the item's
  effective embedding goes through the head's OV circuit and the unembedding; chance is 1/len(sequence).
* **positional**: one minus the mean total-variation distance between the head's attention rows on two
  independent random sequences (positions of the unrepeated half only): 1 when attention depends on
  positions alone. Previous-token and sink heads are positional in this sense too.
* **sink**: mean attention on the first position.
* **subword_joining**: in natural text, the mass that a word's non-initial piece pays to the word's earlier
  pieces (its previous piece included, so previous-token heads score too; compare both rows).

The **effective embedding** of a token (Gould et al.) is the residual after block 0 for a one-token
prompt: embedding, the block's attention on itself and its MLP. OV read-outs put it through the head's
layer's attention norm, W_V (+ b_V), W_O (and the attention post-norm where the model has one), the final
norm's gain and the unembedding; only the probe tokens' columns are computed.

Also measured: the loss on the first and the second copy of ``[BOS] R R`` (an induction circuit makes the
second much lower). Shapes: the atlas is (role, layer, head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lmscope import specs
from lmscope.errors import InputError
from lmscope.models import Model
from lmscope.results import Axis, Result

ROLES = ("previous_token", "duplicate_token", "induction", "copying", "attend_predicted", "ov_suppression",
         "copy_suppression", "successor", "positional", "sink", "subword_joining")

SEQUENCES = {
    "numbers": [str(i) for i in range(1, 21)],
    "number_words": "one two three four five six seven eight nine ten eleven twelve".split(),
    "days": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "months": ("January February March April May June July August September October November "
               "December").split(),
    "letters": [chr(c) for c in range(ord("A"), ord("Z") + 1)],
}


@dataclass(frozen=True)
class HeadsConfig:
    """Score every head for previous-token, duplicate-token, induction, copying, copy-suppression, successor,
    positional, sink and subword-joining roles."""

    n: int = specs.option(50, "Length of the random sequence R in [BOS] R R.")
    batch: int = specs.option(8, "Random sequences (two halves are compared for the positional score).")
    texts: int = specs.option(16, "Contexts of the corpus for the copy-suppression and subword probes.")
    context: int = specs.option(64, "Tokens per corpus context.")
    probe_tokens: int = specs.option(400, "Tokens whose effective embeddings probe the OV circuits.")
    corpus: str = specs.option("default", "Corpus of the natural-text probes ('default', a .txt file or folder).")
    top: int = specs.option(3, "Top heads per role that get evidence (pattern, OV read-out).")
    seed: int = specs.option(0, "Seed of the random tokens.")

    def __post_init__(self):
        for name in ("n", "batch", "texts", "context", "probe_tokens", "top"):
            if getattr(self, name) < (2 if name in ("n", "batch", "context") else 1):
                raise InputError(f"{name}={getattr(self, name)} is too small.")
        if self.batch % 2:
            raise InputError(f"batch={self.batch}: give an even number (two halves are compared).")


# ------------------------------------------------------------------------------------------------ probes
def repeated_tokens(model: Model, n: int, batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 1 + 2n) ids ``[BOS] R R`` (no BOS when the tokenizer has none), R uniform over the tokens that are
    not special tokens."""
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.ones(model.W_E.shape[0], dtype=torch.bool)
    ordinary[[i for i in model.tokenizer.all_special_ids if i < len(ordinary)]] = False
    pool = ordinary.nonzero()[:, 0]
    r = pool[torch.randint(len(pool), (batch, n), generator=g)]
    bos = model.tokenizer.bos_token_id
    parts = ([torch.full((batch, 1), bos)] if bos is not None else []) + [r, r]
    return torch.cat(parts, dim=1)


def pattern_scores(patterns: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Previous-token, duplicate-token and induction scores (H,) from one layer's patterns (B, H, T, T) on ids (B, T).

    Duplicate and induction are averaged over query positions that have a target (an earlier equal token,
    or a token after one); previous-token over every position ≥ 1.
    """
    b, h, t, _ = patterns.shape
    same = ids[:, :, None] == ids[:, None, :]  # (B, Tq, Tk)
    earlier = torch.ones(t, t, dtype=torch.bool).tril(-1)
    dup = same & earlier
    ind = torch.zeros_like(dup)
    ind[:, :, 1:] = same[:, :, :-1] & earlier[:, :-1]  # key j where ids[j-1] == ids[i], j-1 < i
    ind &= torch.ones(t, t, dtype=torch.bool).tril()  # j <= i
    prev = patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))

    def masked(mask):
        rows = mask.any(-1)  # (B, Tq)
        mass = (patterns * mask[:, None].to(patterns)).sum(-1)  # (B, H, Tq)
        return (mass * rows[:, None]).sum(dim=(0, 2)) / rows.sum().clamp_min(1)

    return {"previous_token": prev, "duplicate_token": masked(dup), "induction": masked(ind)}


def positional_score(patterns: torch.Tensor, upto: int) -> torch.Tensor:
    """(H,) 1 − mean TV distance between rows of the first and second half of the batch (query positions < upto)."""
    half = patterns.shape[0] // 2
    a, b = patterns[:half, :, :upto, :upto], patterns[half:2 * half, :, :upto, :upto]
    return 1 - 0.5 * (a - b).abs().sum(-1).mean(dim=(0, 2))


def effective_embeddings(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """(n, D) residual after block 0 for each token as a one-token prompt (Gould et al.'s effective embedding)."""
    out = model.run(ids.view(-1, 1), cache=["blocks.0.resid_post"], logits="none")
    return out["blocks.0.resid_post"][:, 0].float()


def ov_logits(model: Model, layer: int, x: torch.Tensor, out_ids: torch.Tensor) -> torch.Tensor:
    """(H, n, m) direct logits of ``out_ids`` when every head of ``layer`` attends to residuals x (n, D)."""
    with torch.no_grad():
        xn = model.norm(f"blocks.{layer}.ln1", x)
        v = torch.einsum("nd,hde->hne", xn, model.W_V(layer).float())
        bv = model.b_V(layer)
        if bv is not None:
            v = v + bv.float()[:, None]
        out = torch.einsum("hne,hed->hnd", v, model.W_O(layer).float())
        if model.spec.post_norms:
            out = model.norm(f"blocks.{layer}.ln1_post", out)
        out = model.norm("ln_final", out, scale=1.0)
        return out @ model.W_U[:, out_ids.to(model.W_U.device)].float()


def copying_scores(model: Model, layer: int, WUE: torch.Tensor) -> torch.Tensor:
    """(H,) Σ Re λ / Σ |λ| of W_O N_f (W_U W_E) N1 W_V per head (``WUE`` = W_U W_E, (D, D))."""
    with torch.no_grad():
        eye = torch.eye(model.spec.d_model, device=model.device)
        n1 = model.norm(f"blocks.{layer}.ln1", eye, scale=1.0)
        nf = model.norm("ln_final", eye, scale=1.0)
        mid = nf @ WUE @ n1  # (D, D), rows act on the right of W_O
        m = torch.einsum("hed,df,hfg->heg", model.W_O(layer).float(), mid, model.W_V(layer).float())
        lam = torch.linalg.eigvals(m.double())
        return (lam.real.sum(-1) / lam.abs().sum(-1).clamp_min(1e-12)).float()


def successor_pairs(model: Model) -> list[tuple[list[int], str]]:
    """Ordinal sequences as token ids (variants with and without a leading space; an item that is not one
    token ends a run), each with at least 3 items."""
    out = []
    for name, items in SEQUENCES.items():
        for prefix in (" ", ""):
            run: list[int] = []
            for item in items + [None]:
                ids = None if item is None else model.tokenizer.encode(prefix + item, add_special_tokens=False)
                if ids is not None and len(ids) == 1 and ids[0] != model.tokenizer.unk_token_id:
                    run.append(ids[0])
                    continue
                if len(run) >= 3 and len(set(run)) == len(run):
                    out.append((run, f"{name}{'' if prefix else '(no space)'}"))
                run = []
    return out


# ------------------------------------------------------------------------------------------------ atlas
def head_atlas(model: Model, config: HeadsConfig | None = None, *, progress: bool = True) -> Result:
    """The head atlas: scores (role, layer, head) for :data:`ROLES`, with evidence for the top heads in meta."""
    config = config or HeadsConfig()
    from lmscope.data.corpus import token_contexts

    L, H = model.spec.n_layers, model.spec.n_heads
    scores = torch.zeros(len(ROLES), L, H)
    r = {name: i for i, name in enumerate(ROLES)}
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(L)]
    bar = tqdm(total=5, desc="head detectors", disable=not progress)

    # 1. repeated random tokens: previous/duplicate/induction, positional, sink, loss on each half
    ids = repeated_tokens(model, config.n, config.batch, config.seed)
    off = ids.shape[1] - 2 * config.n
    out = model.run(ids, cache=sites)
    evidence_patterns = {}
    for layer in range(L):
        p = out[sites[layer]].float()
        for name, s in pattern_scores(p, ids).items():
            scores[r[name], layer] = s
        scores[r["positional"], layer] = positional_score(p, off + config.n)
        scores[r["sink"], layer] = p[..., 0].mean(dim=(0, 2))
        evidence_patterns[layer] = p.mean(0)  # (H, T, T)
    logp = out.logits.float().log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]  # predicts token t+1
    first = nll[:, off:off + config.n - 1].mean().item()  # predictions of R[1..n-1] (first copy)
    second = nll[:, off + config.n - 1:].mean().item()  # predictions of the second copy
    bar.update()

    # 2. weights: copying eigenvalue score
    with torch.no_grad():
        WUE = model.W_U.float() @ model.W_E.float()
    for layer in range(L):
        scores[r["copying"], layer] = copying_scores(model, layer, WUE)
    del WUE
    bar.update()

    # 3. OV read-outs of effective embeddings: suppression and successor
    g = torch.Generator().manual_seed(config.seed + 1)
    n_probe = min(config.probe_tokens, model.spec.d_vocab)
    probe = torch.randperm(model.W_E.shape[0], generator=g)[:n_probe]
    succ = successor_pairs(model)
    succ_ids = sorted({i for run, _ in succ for i in run})
    emb = effective_embeddings(model, torch.tensor(probe.tolist() + succ_ids))
    emb_probe, emb_succ = emb[:n_probe], emb[n_probe:]
    succ_index = {t: k for k, t in enumerate(succ_ids)}
    k_bottom = max(1, round(0.05 * n_probe))
    succ_examples: dict[str, list] = {}
    for layer in range(L):
        lg = ov_logits(model, layer, emb_probe, probe)  # (H, n, n)
        own = lg.diagonal(dim1=1, dim2=2)
        rank_from_bottom = (lg < own[..., None]).sum(-1)  # how many tokens are below the own token
        scores[r["ov_suppression"], layer] = (rank_from_bottom < k_bottom).float().mean(-1)
        if succ:
            lg_s = ov_logits(model, layer, emb_succ, torch.tensor(succ_ids))  # (H, m, m)
            hits = torch.zeros(H)
            total = 0
            for run, _ in succ:
                cols = torch.tensor([succ_index[t] for t in run])
                sub = lg_s[:, cols][:, :, cols]  # (H, len, len)
                top = sub[:, :-1].argmax(-1)  # (H, len-1)
                hits += (top == torch.arange(1, len(run))).float().sum(-1)
                total += len(run) - 1
            scores[r["successor"], layer] = hits / total
    bar.update()

    # 4. natural text: attention to the predicted token's earlier occurrences, subword joining
    ctx = token_contexts(model, config.corpus, context=min(config.context, model.spec.n_ctx),
                         max_tokens=config.texts * config.context)
    out_t = model.run(ctx, cache=sites)
    pred = out_t.logits.argmax(-1).cpu()  # (B, T) the model's own prediction at each position
    t = ctx.shape[1]
    earlier_eq = (ctx[:, None, :] == pred[:, :, None]) & torch.ones(t, t, dtype=torch.bool).tril()
    pieces = _word_pieces(model, ctx)  # (B, T, T) earlier pieces of the same word
    for layer in range(L):
        p = out_t[sites[layer]].float().cpu()
        for name, mask in (("attend_predicted", earlier_eq), ("subword_joining", pieces)):
            rows = mask.any(-1)
            mass = (p * mask[:, None]).sum(-1)
            scores[r[name], layer] = (mass * rows[:, None]).sum(dim=(0, 2)) / rows.sum().clamp_min(1)
    scores[r["copy_suppression"]] = scores[r["attend_predicted"]] * scores[r["ov_suppression"]]
    bar.update()

    # 5. evidence for the top heads
    meta = {"repeated_tokens": {"n": config.n, "loss_first_copy": first, "loss_second_copy": second,
                                "chance_induction": 1.0 / (config.n + off)},
            "successor_sequences": [name for _, name in succ], "top_heads": {}, "evidence": {},
            "successor_chance": sum((len(run) - 1) / len(run) for run, _ in succ)
            / max(1, sum(len(run) - 1 for run, _ in succ))}
    extras = {}
    for name in ROLES:
        flat = scores[r[name]].flatten()
        best = flat.topk(min(config.top, flat.numel())).indices.tolist()
        meta["top_heads"][name] = [[f"L{i // H}.H{i % H}", float(flat[i])] for i in best]
        layer, head = divmod(best[0], H)
        ev = {"head": f"L{layer}.H{head}"}
        if name in ("previous_token", "duplicate_token", "induction", "positional", "sink"):
            extras[f"pattern.{name}"] = evidence_patterns[layer][head]
            ev["pattern"] = f"extras['pattern.{name}']: mean attention on [BOS] R R"
        if name in ("copying", "ov_suppression", "copy_suppression", "successor"):
            ev["ov"] = _ov_evidence(model, layer, head, name, succ, emb_probe, probe, emb_succ, succ_ids)
        meta["evidence"][name] = ev
    bar.update()
    bar.close()
    return Result(scores, (Axis("role", ROLES), Axis("layer", range(L)), Axis("head", range(H))), "heads",
                  model.name, None, {k: getattr(config, k) for k in config.__dataclass_fields__}, extras, meta)


def _word_pieces(model: Model, ctx: torch.Tensor) -> torch.Tensor:
    """(B, T, T) True where key j < i is an earlier piece of the same word as query i (a piece continues a word
    when it starts with a letter and has no leading space, and so did its predecessor or it follows one)."""
    vocab = {i: model.decode([i]) for i in set(ctx.flatten().tolist())}
    b, t = ctx.shape
    mask = torch.zeros(b, t, t, dtype=torch.bool)
    for row in range(b):
        start = 0
        prev_alpha = False
        for i, tok in enumerate(ctx[row].tolist()):
            s = vocab[tok]
            cont = prev_alpha and s[:1].isalpha()
            if cont:
                mask[row, i, start:i] = True
            else:
                start = i
            prev_alpha = s[:1].isalpha() or (s[:1] == " " and s[1:2].isalpha())
    return mask


def _ov_evidence(model, layer, head, role, succ, emb_probe, probe, emb_succ, succ_ids) -> list:
    """What the head's OV read-out does for a few inputs: [input, top output (or the successor verdict)]."""
    rows = []
    if role == "successor" and succ:
        lg = ov_logits(model, layer, emb_succ, torch.tensor(succ_ids))[head]
        index = {t: k for k, t in enumerate(succ_ids)}
        for run, _ in succ[:3]:
            cols = [index[t] for t in run]
            for a in range(min(4, len(run) - 1)):
                top = cols[int(lg[cols[a]][cols].argmax())]
                rows.append([model.decode([run[a]]), model.decode([succ_ids[top]])])
        return rows
    lg = ov_logits(model, layer, emb_probe[:8], probe)[head]
    for k in range(lg.shape[0]):
        order = lg[k].argsort(descending=role == "copying")
        rows.append([model.decode([int(probe[k])]), [model.decode([int(probe[j])]) for j in order[:3]]])
    return rows


def atlas_grid(atlas: Result) -> Result:
    """The atlas as one 2-D Result (layer × role:head), for a single heat map (--png/--html of ``lmscope heads``)."""
    roles, layers, heads = atlas.axes
    values = atlas.values.permute(1, 0, 2).reshape(len(layers), -1)
    labels = tuple(f"{r}:{h}" for r in roles.labels for h in heads.labels)
    return Result(values, (layers, Axis("role_head", labels)), "heads", atlas.model, None, atlas.params, {},
                  {k: atlas.meta[k] for k in ("repeated_tokens", "top_heads")})


def run_heads(model: Model, inputs: None, config: HeadsConfig) -> Result:
    """Head atlas: every head scored for the canonical roles (previous-token, induction, copy suppression, ...)."""
    return head_atlas(model, config)


specs.register(specs.MethodSpec("heads", "behaviors", "none", HeadsConfig, run_heads,
                                sites=("attn.pattern", "resid_post")))
