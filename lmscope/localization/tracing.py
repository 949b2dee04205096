"""Causal tracing (Meng et al., "Locating and Editing Factual Associations in GPT", NeurIPS 2022).

Corrupt a factual prompt by adding Gaussian noise (``noise`` × σ, 3σ by default) to the embeddings of
the subject tokens only, in ``samples`` noised copies of the prompt. As in the paper, σ is the standard
deviation of *subject* embeddings: over all entries of the embeddings of the tokens of a set of subjects
(``noise_subjects``; by default the traced subject and the countries of the built-in factual task, the
analogue of the paper's dataset subjects). ``noise_basis="vocab"`` uses the whole vocabulary's
embeddings instead (an earlier default here; on SmolLM2 it is a different scale). Then restore one clean state at a time and measure the probability of the clean answer
(averaged over the noised copies):

* ``kind="hidden"``: the block output (``resid_post``) at one layer and position;
* ``kind="mlp"`` / ``"attn"``: the MLP / attention output at one position over a window of
  ``window`` consecutive layers centred on the layer (10 in the paper).
* State-space models (Mamba; Sen Sharma et al. 2024): ``kind="ssm"`` (the block's write o),
  ``"ssm_s"`` (the scan output s) and ``"gate"`` (the gate g), windowed like ``mlp``/``attn``.
* RWKV: ``kind="wkv"`` (the time mix's write), ``"wkv_s"`` (the WKV output), ``"receptance"`` (its gate σ(r)),
  and ``"mlp"`` (the channel mix's write), windowed likewise.

The same noise is used for every cell of one trace (seeded), as in the reference code. The result
is a heat map over layer × position of the restored probability; ``extras`` hold the indirect
effect (restored − corrupted) and ``meta`` the clean and corrupted probabilities. Effects usually
concentrate at the last subject token in early-middle layers (MLP) and at the last token in later
layers (attention). METHODS.md §5.2.

Public API::

    causal_trace(model, prompt, subject, target=None, *, kind="hidden", window=None, samples=10,
                 noise=3.0, seed=1, layers=None, noise_basis="subjects", noise_subjects=None) -> Result
    subject_positions(model, prompt, subject) -> list[int]
    subject_embedding_std(model, subjects) -> float;  embedding_std(model) -> float
"""

from __future__ import annotations

from dataclasses import dataclass
from lmscope import specs
from collections.abc import Sequence

import torch

from lmscope.errors import InputError
from lmscope.interventions import Add, Patch
from lmscope.models import Model
from lmscope.results import Axis, Result
from lmscope.sites import resolve_count, resolve_layers

# Noised copies run together: every restored (layer, position) set carries all of them, so the batches grow
# with ``samples``. ROME's tracing uses 10; past a few hundred the estimate no longer sharpens visibly and the
# batches outgrow a CPU's memory.
MAX_SAMPLES = 256

KINDS = {"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
NOISE_BASES = ("subjects", "vocab")


KINDS.update(ssm="ssm_out", ssm_s="ssm.out", gate="ssm.gate")  # state-space models (Mamba): write, scan output, gate
KINDS.update(wkv="wkv_out", wkv_s="wkv.out", receptance="wkv.r")  # RWKV's time mix: write, WKV output, receptance


def subject_positions(model: Model, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` (its first occurrence) in ``prompt``; a clear error if absent."""
    start = prompt.find(subject)
    if not subject.strip() or start < 0:
        raise InputError(f"The subject {subject!r} does not occur in the prompt {prompt!r}; give the subject "
                         "exactly as it is written there (case and spaces matter).")
    end = start + len(subject)
    enc = model.tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=True)
    pos = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start]
    if not pos:
        raise InputError(f"The subject {subject!r} covers no token of the prompt.")
    return pos


def embedding_std(model: Model, sample: int = 8192) -> float:
    """Standard deviation over all entries of the token embeddings as the model uses them
    (including any embedding scale, e.g. Gemma's √d), over up to ``sample`` token ids."""
    ids = torch.linspace(0, model.spec.d_vocab - 1, min(sample, model.spec.d_vocab)).long()
    return float(model.embed_tokens(ids).float().std())


def subject_embedding_std(model: Model, subjects: Sequence[str]) -> float:
    """Standard deviation over all entries of the embeddings (as the model uses them) of the tokens of
    ``subjects``, each tokenised as it appears inside a sentence (after a space); tokens repeat as often
    as they occur. Meng et al.'s σ, computed there over the subjects of their dataset."""
    ids = [i for s in subjects for i in model.tokenizer(" " + s.strip(), add_special_tokens=False)["input_ids"]]
    if len(ids) < 2:
        raise InputError(f"The noise subjects {list(subjects)[:5]} give {len(ids)} token(s); give more subjects "
                         "(σ needs at least 2 embeddings).")
    with torch.no_grad():
        return float(model.embed_tokens(torch.tensor(ids)).float().std())


def default_noise_subjects(subject: str) -> tuple[str, ...]:
    """The traced subject and the countries of the built-in factual task."""
    from lmscope.localization.tasks import CAPITALS

    return (subject, *(country for country, _ in CAPITALS))


def causal_trace(model: Model, prompt: str, subject: str, target: str | int | None = None, *,
                 kind: str = "hidden", window: int | None = None, samples: int = 10, noise: float = 3.0,
                 seed: int = 1, layers: Sequence[int] | None = None, chunk_size: int | None = None,
                 noise_basis: str = "subjects", noise_subjects: Sequence[str] | None = None,
                 progress: bool = False, positions: Sequence[int] | None = None) -> Result:
    """Restored answer probability for every (layer, position) cell; see the module docstring.

    ``target`` defaults to the clean run's top-1 token. ``window`` defaults to 1 for ``hidden`` and
    10 for ``mlp``/``attn``. σ of the noise: ``noise_basis`` "subjects" (over ``noise_subjects``, default
    :func:`default_noise_subjects`) or "vocab" (:func:`embedding_std`). ``positions`` restricts the restored
    positions (default: all).
    """
    if kind not in KINDS:
        raise InputError(f"kind={kind!r}: use one of {tuple(KINDS)}.")
    if noise_basis not in NOISE_BASES:
        raise InputError(f"noise_basis={noise_basis!r}: use one of {NOISE_BASES}.")
    if samples < 1:
        raise InputError("samples must be at least 1.")
    resolve_count(samples, MAX_SAMPLES, "noised copies (samples)")
    if noise <= 0:
        raise InputError("noise must be positive (a multiple of the embedding standard deviation).")
    n_layers = model.spec.n_layers
    if window is None:
        window = 1 if kind == "hidden" else min(10, n_layers)
    model.require([KINDS[kind]], f"Causal tracing of {kind}")
    if not 1 <= window <= n_layers:
        raise InputError(f"window={window}: restore between 1 and {n_layers} consecutive layers ({model.name} has "
                         f"{n_layers}).")
    subj = subject_positions(model, prompt, subject)
    batch = model.encode(prompt)
    t = batch.input_ids.shape[1]
    layers = resolve_layers(layers, n_layers)
    if positions is not None and (not positions or any(not -t <= p < t for p in positions)):
        raise InputError(f"positions {list(positions)}: give positions of the {t}-token prompt (negative ones count "
                         "from the end).")
    cells = list(range(t)) if positions is None else [p % t for p in positions]
    site_kind = KINDS[kind]
    with torch.no_grad():
        clean = model.run(batch, cache=[f"blocks.{l}.{site_kind}" for l in range(n_layers)], logits="last")
    tid = int(clean.logits[0].argmax()) if target is None else model.token_id(target)
    if noise_basis == "vocab":
        sigma = noise * embedding_std(model)
    else:
        sigma = noise * subject_embedding_std(model, noise_subjects or default_noise_subjects(subject))
    g = torch.Generator().manual_seed(seed)
    noise_STD = torch.zeros(samples, t, model.spec.d_model)
    noise_STD[:, subj] = torch.randn(samples, len(subj), model.spec.d_model, generator=g) * sigma
    corrupt = Add("embed", vector=noise_STD.to(model.device), positions=subj)
    rows = batch.repeat(samples)

    def window_of(layer):
        lo = max(0, min(layer - window // 2, n_layers - window))
        return range(lo, min(n_layers, lo + window))

    sets = [[corrupt]]
    for layer in layers:
        for p in cells:
            names = [f"blocks.{layer}.{site_kind}"] if kind == "hidden" else \
                [f"blocks.{x}.{site_kind}" for x in window_of(layer)]
            sets.append([corrupt] + [Patch(nm, value=clean[nm], positions=[p]) for nm in names])
    out = model.run_sets(rows, sets, logits="last", chunk_size=chunk_size, progress=progress)
    probs = torch.softmax(out.logits.float(), dim=-1)[..., tid].mean(-1)  # (N,)
    low, restored = float(probs[0]), probs[1:].reshape(len(layers), len(cells))
    high = float(torch.softmax(clean.logits[0].float(), -1)[tid])
    tokens = batch.str_tokens[0]
    labels = tuple(f"{i}:{tokens[i]}{'*' if i in subj else ''}" for i in cells)
    return Result(
        restored.cpu(), axes=(Axis("layer", tuple(layers)), Axis("position", labels)),
        method=f"causal_trace.{kind}", model=model.name,
        target={"target": model.decode([tid]), "target_id": tid, "subject": subject},
        params={"kind": kind, "window": window, "samples": samples, "noise": noise, "seed": seed,
                "noise_basis": noise_basis},
        extras={"indirect_effect": (restored - low).cpu()},
        meta={"prompt": prompt, "subject_positions": subj, "clean_prob": high, "corrupt_prob": low,
              "noise_std": sigma},
    )


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class TraceConfig:
    """Causal tracing of a factual prompt (the target defaults to the clean top-1 token)."""

    subject: str = specs.option(help="Subject text as written in the prompt, e.g. 'The Eiffel Tower'.")
    kind: str = specs.option("hidden", "hidden | mlp | attn; Mamba: ssm | ssm_s | gate; RWKV: wkv | wkv_s | "
                                              "receptance (and mlp)", choices=tuple(KINDS))
    samples: int = specs.option(10, "Noised copies.")
    noise: float = specs.option(3.0, "Noise std as a multiple of σ, the std of subject embeddings (Meng et al.).")
    noise_basis: str = specs.option("subjects", "σ over subject embeddings (this subject and the built-in "
                                                "countries) or over the whole vocabulary.", choices=NOISE_BASES)
    window: int | None = specs.option(None, "Layers restored together (default 1 for hidden, 10 otherwise).")
    seed: int = specs.option(1, "Seed of the noise.")

    def __post_init__(self):
        specs.check_config(self)
        if self.samples < 1 or (self.window is not None and self.window < 1):
            raise InputError("--samples and --window must be positive.")
        if self.samples > MAX_SAMPLES:
            raise InputError(f"--samples {self.samples}: give at most {MAX_SAMPLES} noised copies (they run together "
                             "in every batch; 10 is the usual number).")


def run_trace(model: Model, prompt: specs.Prompt, config: TraceConfig) -> Result:
    """Causal tracing (Meng et al.): restore clean states into a subject-noised run, layer × position."""
    return causal_trace(model, prompt.text, config.subject, prompt.target, kind=config.kind, samples=config.samples,
                        noise=config.noise, window=config.window, seed=config.seed, noise_basis=config.noise_basis,
                        progress=True)


specs.register(specs.MethodSpec("trace", "localization", "prompt", TraceConfig, run_trace,
                                sites=("embed", "resid_post"), cli_inputs=("text", "target")))
