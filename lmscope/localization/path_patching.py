"""Path patching (Wang et al. 2023, IOI; Goldowsky-Dill et al. 2023): the effect of a sender along
direct paths only.

For a sender component S (an attention head or an MLP layer) and receivers R (the queries, keys or
values of some heads, or the logits), in the noising direction (METHODS.md §5.3):

1. run the clean prompts and cache every head's ``z`` (and every MLP output);
2. run the clean prompts again with S's output set to its corrupted value and every other head
   frozen to its clean ``z`` (MLPs frozen too when ``freeze_mlps=True``; by default they are not,
   so paths through MLPs count); record the receivers' q/k/v inputs;
3. run the clean prompts with only the receivers' q/k/v replaced by those recorded values, and
   measure the metric.

With ``receivers="logits"`` step 3 is skipped and the metric is read from step 2 (the direct
effect of S on the logits, through MLPs unless frozen). Scores are normalised like noising:
0 = no effect, −1 = the behaviour is destroyed. Receiver inputs are per query head (GQA keys and
values expanded), so patching the keys of one head leaves the other heads of its group alone.

Public API::

    path_patching(model, pairs, receivers, *, senders=None, receiver_input="q", metric="logit_diff",
                  positions=None, freeze_mlps=False, normalise=True) -> Result
        receivers: list of (layer, head) or "logits"; senders: list of (layer, head) or ("mlp", layer),
        default every head below the highest receiver layer. Result axes: (sender,) with labels
        "L{layer}.H{head}" / "MLP{layer}".

As a spec (``lmscope path-patching``, :class:`PathPatchConfig`), receivers and senders are written as
text: ``"logits"`` or ``"9.6,9.9"`` (LAYER.HEAD, comma-separated), senders also ``mlp3``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscope import specs
from lmscope.errors import InputError
from lmscope.interventions import Patch
from lmscope.localization.metrics import metric_kind
from lmscope.localization.patching import prepare
from lmscope.localization.tasks import PromptPairs
from lmscope.models import Model
from lmscope.results import Axis, Result

Component = tuple  # (layer, head) or ("mlp", layer)


def _label(c: Component) -> str:
    return f"MLP{c[1]}" if c[0] == "mlp" else f"L{c[0]}.H{c[1]}"


def _check_component(model: Model, c, what: str) -> Component:
    s = model.spec
    if isinstance(c, tuple) and len(c) == 2 and c[0] == "mlp" and isinstance(c[1], int) and 0 <= c[1] < s.n_layers:
        model.require(["mlp_out"], f"Path patching with MLP {what.lower()}s")
        return c
    if (isinstance(c, tuple) and len(c) == 2 and all(isinstance(x, int) for x in c)
            and 0 <= c[0] < s.n_layers and 0 <= c[1] < s.n_heads):
        return c
    raise InputError(f"{what} {c!r} is not a component of {model.name}: use (layer, head) with layer < "
                     f"{s.n_layers} and head < {s.n_heads}, or ('mlp', layer).")


def path_patching(model: Model, pairs: PromptPairs, receivers: Sequence[tuple[int, int]] | str, *,
                  senders: Sequence[Component] | None = None, receiver_input: str = "q",
                  metric: str = "logit_diff", positions: Sequence[int] | None = None,
                  freeze_mlps: bool = False, normalise: bool = True, chunk_size: int | None = None) -> Result:
    """Score each sender by its effect on the metric through the receivers only (see the module docstring).

    ``positions`` restricts the receivers' patched inputs to some positions (e.g. END), default all.
    """
    if receiver_input not in ("q", "k", "v"):
        raise InputError(f"receiver_input={receiver_input!r}: use 'q', 'k' or 'v'.")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise InputError(f"receivers={receivers!r}: give a list of (layer, head) or 'logits'.")
    if not to_logits:
        receivers = [_check_component(model, tuple(r), "Receiver") for r in receivers]
        if not receivers or any(r[0] == "mlp" for r in receivers):
            raise InputError("Receivers must be attention heads (layer, head), or 'logits'.")
    s = model.spec
    top = s.n_layers if to_logits else max(r[0] for r in receivers)
    if senders is None:
        senders = [(layer, h) for layer in range(top) for h in range(s.n_heads)]
    senders = [_check_component(model, tuple(c), "Sender") for c in senders]
    setup = prepare(model, pairs, metric)
    clean, corrupt = setup.clean, setup.corrupt
    z_names = [f"blocks.{layer}.attn.z" for layer in range(s.n_layers)]
    if freeze_mlps:
        model.require(["mlp_out"], "Path patching with freeze_mlps=True")
    has_mlp = "mlp" in model.parts  # an attention-only model has no MLPs to freeze or patch
    mlp_names = [f"blocks.{layer}.mlp_out" for layer in range(s.n_layers)] if has_mlp else []
    with torch.no_grad():
        c_cache = model.run(clean, cache=z_names + mlp_names, logits="none").cache
        r_cache = model.run(corrupt, cache=z_names + mlp_names, logits="none").cache

    # step 2: one set per sender, all heads frozen to clean except the sender (corrupted)
    step2 = []
    for c in senders:
        ivs = []
        for layer in range(s.n_layers):
            z = c_cache[z_names[layer]]
            if c[0] == layer:
                z = z.clone()
                z[:, :, c[1]] = r_cache[z_names[layer]][:, :, c[1]]
            ivs.append(Patch(z_names[layer], value=z))
            if c == ("mlp", layer):
                ivs.append(Patch(mlp_names[layer], value=r_cache[mlp_names[layer]]))
            elif freeze_mlps:
                ivs.append(Patch(mlp_names[layer], value=c_cache[mlp_names[layer]]))
        step2.append(ivs)
    if to_logits:
        out = model.run_sets(clean, step2, logits="last", chunk_size=chunk_size)
        raw = setup.metric(out.logits)
    else:
        r_layers = sorted({r[0] for r in receivers})
        r_names = [f"blocks.{layer}.attn.{receiver_input}" for layer in r_layers]
        rec = model.run_sets(clean, step2, cache=r_names, logits="none", chunk_size=chunk_size).cache
        step3 = []
        for i in range(len(senders)):
            ivs = []
            for layer, name in zip(r_layers, r_names):
                hs = [h for (lr, h) in receivers if lr == layer]
                ivs.append(Patch(name, value=rec[name][i], heads=hs, positions=positions))
            step3.append(ivs)
        raw = setup.metric(model.run_sets(clean, step3, logits="last", chunk_size=chunk_size).logits)
    vals = setup.normalise(raw, "noise") if normalise else raw
    return Result(
        vals.float().cpu(), axes=(Axis("sender", tuple(_label(c) for c in senders)),),
        method="path_patching", model=model.name,
        target={"targets": list(pairs.targets[:5]), "foils": list(pairs.foils[:5]), "metric": metric},
        params={"receivers": "logits" if to_logits else [_label(r) for r in receivers],
                "receiver_input": None if to_logits else receiver_input, "freeze_mlps": freeze_mlps,
                "positions": None if positions is None else list(positions), "normalise": normalise},
        extras={"raw": raw.float().cpu()},
        meta={"clean_metric": setup.clean_value, "corrupt_metric": setup.corrupt_value},
    )


# ------------------------------------------------------------------------------------------------ spec
def parse_components(text: str, what: str) -> list[Component]:
    """``"9.6, 10.7, mlp3"`` -> ``[(9, 6), (10, 7), ("mlp", 3)]`` (ranges are checked against the model later)."""
    out: list[Component] = []
    for item in (t.strip() for t in text.split(",")):
        try:
            if item.lower().startswith("mlp"):
                out.append(("mlp", int(item[3:])))
            else:
                layer, head = item.split(".")
                out.append((int(layer), int(head)))
        except ValueError:
            raise InputError(f"--{what} {text!r}: write LAYER.HEAD (e.g. 9.6) or mlpLAYER (e.g. mlp3), "
                             "comma-separated.") from None
    return out


@dataclass(frozen=True)
class PathPatchConfig:
    """Path patching: each sender's effect through the receivers only (noising, normalised like patching)."""

    receivers: str = specs.option("logits", "'logits', or receiver heads as LAYER.HEAD, comma-separated "
                                            "(e.g. 9.6,9.9).")
    senders: str | None = specs.option(None, "Sender heads LAYER.HEAD and MLPs mlpLAYER, comma-separated (default: "
                                             "every head below the highest receiver layer).")
    receiver_input: str = specs.option("q", "Which input of the receiver heads is patched: q | k | v.",
                                       choices=("q", "k", "v"))
    metric: str = specs.option("logit_diff", "logit_diff | probability | log_prob | kl.")
    freeze_mlps: bool = specs.option(False, "Freeze MLPs to their clean outputs (direct paths through heads only).",
                                     flags=("--freeze-mlps",))
    normalise: bool = specs.option(True, "Normalise: 0 = no effect, -1 = the behaviour destroyed.",
                                   flags=("--normalise/--raw",))

    def __post_init__(self):
        specs.check_config(self)
        metric_kind(self.metric, method="path patching")
        if self.receivers != "logits":
            parse_components(self.receivers, "receivers")
        if self.senders is not None:
            parse_components(self.senders, "senders")


def run_path_patching(model: Model, pairs: PromptPairs, config: PathPatchConfig) -> Result:
    """Path patching: the effect of each sender head (or MLP) along direct paths to the receivers or logits."""
    receivers = "logits" if config.receivers == "logits" else parse_components(config.receivers, "receivers")
    senders = None if config.senders is None else parse_components(config.senders, "senders")
    return path_patching(model, pairs, receivers, senders=senders, receiver_input=config.receiver_input,
                         metric=config.metric, freeze_mlps=config.freeze_mlps, normalise=config.normalise)


specs.register(specs.MethodSpec("path-patching", "localization", "pairs", PathPatchConfig, run_path_patching,
                                sites=("attn.z", "attn.q")))
