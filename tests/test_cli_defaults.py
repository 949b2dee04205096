"""Every CLI command with only its required options, on the built-in models, so that a default that
cannot work on them (like `project --head`'s token list holding ' 1', which SmolLM2 splits) is caught.

The CLI runs in-process (typer's CliRunner) and each built-in model is loaded once: ``lmscope.load`` is
memoised for this module, so what runs is the command itself. ``CASES`` must name every command the CLI
has (``test_every_command_has_a_case``): a new command fails this file until its case is added, one line
``(command, args, text its output must hold)``.

Options that are not defaults: the required ones, and the *size* options of ``SIZE`` (how many tokens,
steps, prompts, samples or examples), each with its reason. Every other default (layers, sites, token
lists, targets, tasks, nodes, methods) is the command's own.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import lmscope
from lmscope.cli.main import app

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
FACT = "The Eiffel Tower is in the city of"
_STEER = ["--positive", " Love", "--negative", " Hate", "--layer", "6", "--prompt", "I think you"]

# (command, required options, text the output must hold); "{SAE}" is the folder `sae train` writes (its site
# defaults to the middle layer: blocks.15 of 30).
CASES = [
    ("models", [], "smollm2-135m"),
    ("demo", [], "report written to lmscope-demo/report.html"),
    ("attribute", ["--prompt", IOI], "integrated"),
    ("atp", [], "ATP (denoise) by head"),
    ("dla", ["--prompt", IOI, "--target", " Mary"], "DLA of logit"),
    ("circuit", [], "EAP circuit for ioi"),
    ("flow", ["--prompt", IOI], "Route into position"),
    ("flow-graph", ["--prompt", IOI], "(resid)"),
    ("flow-node", ["--prompt", IOI], "flow-node: logit lens of resid_post"),
    ("flow-verify", ["--prompt", IOI], "faithfulness"),
    ("head-inspect", ["--prompt", IOI], "head-inspect: L0 H0 at position 13"),
    ("patch-cell", ["--clean", IOI, "--corrupt", IOI_CORRUPT, "--target", " Mary"], "normalised effect"),
    ("path-patching", [], "sender"),            # the IOI task by default
    ("patch", ["--clean", IOI, "--corrupt", IOI_CORRUPT, "--target", " Mary"], "of resid_pre"),
    ("trace", ["--prompt", FACT, "--subject", "The Eiffel Tower"], "Causal trace (hidden)"),
    ("probe", ["--dataset", "sst2"], "logistic probe on sst2 (40 examples"),
    ("patchscope", ["--source", IOI, "--layer", "5"], "Patchscope"),
    ("patchscope eval", [], "Patchscope capitals"),
    ("caa", [], "CAA on myopic-reward"),
    ("project", ["--head", "23.3"], "Head 23.3 OV circuit"),
    ("project", ["--neuron", "20.5"], "Neuron 20.5"),
    ("steer", _STEER, "steered (actadd, layer 6"),
    ("lens", ["--prompt", IOI], "Logit lens at position"),
    ("lens train", ["--tokens", "1024", "--out", "lens"], "wrote lens ("),
    ("lens eval", [], "Held-out lens quality ("),
    ("sae train", ["--arch", "topk", "--out", "sae"], "trained topk SAE on blocks.15.resid_post"),
    ("sae eval", ["{SAE}"], "topk SAE on blocks.15.resid_post"),
    ("sae features", ["{SAE}", "--html", "features.html"], "wrote features.html"),
    ("sae compare", ["{SAE}"], "SAE comparison"),
    ("sae prompt", ["{SAE}", "--prompt", IOI], "SAE features at position 13"),
    ("heads", [], "induction"),
    ("neurons", [], "ResultSet(method='neurons'"),
    ("clamp run", [], "wrote clamp.json"),
    ("clamp plot", ["clamp.json"], "wrote clamp.png"),   # plots what `clamp run` (with its SIZE) writes first
    ("edit", ["--prompt", FACT, "--subject", "The Eiffel Tower", "--target", " Rome"], "(chosen by causal tracing)"),
    ("edit eval", [], "counterfactual facts at layer"),
    ("edit sequential", [], "edits kept at layer"),
    ("recall", [], "in-context answer wins"),
    ("attribute evaluate", [], "random"),
]

# Commands that do not end by themselves, with where they are run instead.
NOT_RUN = {"app": "serves until stopped (Ctrl-C or --requests N); tests/test_app.py runs it"}

# Size options set below their defaults, so the file runs in a few minutes on a CPU (command -> (options, why)).
SIZE = {
    "atp": (["--n", "4"], "4 IOI prompts instead of 20: the same nodes, metric and task"),
    "path-patching": (["--n", "4"], "4 IOI prompts instead of 20: the same senders, receivers and metric"),
    "circuit": (["--n", "4"], "EAP over 4 IOI prompts instead of 20: the same graph, method and selection"),
    "trace": (["--samples", "2"], "2 noised copies instead of 10: every layer × position is still restored"),
    "probe": (["--limit", "40"], "40 examples instead of 400: every layer, 5 folds and the control task remain"),
    "lens eval": (["--tokens", "256"], "256 held-out tokens instead of 4096 (each is unembedded at every layer)"),
    "sae train": (["--tokens", "4096"], "a million tokens (the default, a real SAE) take tens of minutes on a CPU; "
                                        "4096 is one step of the default batch"),
    "sae eval": (["--contexts", "2"], "2 held-out contexts instead of 32 (three forwards each)"),
    "sae features": (["--contexts", "2"], "2 held-out contexts instead of 64"),
    "sae compare": (["--contexts", "2"], "as `sae eval` (used when the folder has no eval.json yet)"),
    "clamp run": (["--steps", "20", "--eval-every", "10"], "20 training steps instead of 3000: every condition's "
                                                          "forward, loss and evaluation still run"),
    "edit": (["--tokens", "2048", "--steps", "5"], "C from 2048 corpus keys instead of 10^6 and 5 Adam steps for v* "
                                                    "instead of 20: the traced layer, prefixes and update are the same"),
    "edit eval": (["--n", "1", "--tokens", "2048", "--steps", "5", "--trace-facts", "1", "--gen-tokens", "5"],
                  "1 fact instead of 100 (as `edit`), 1 traced fact and 5 generated tokens"),
    "edit sequential": (["--n", "2", "--tokens", "2048", "--steps", "3", "--prefixes", "2", "--every", "1",
                         "--ppl-tokens", "256", "--trace-facts", "1"],
                        "2 edits instead of 100, C from 2048 keys, 3 Adam steps and 2 prefixes (as `edit eval`), "
                        "256 held-out tokens; the curve is measured after every edit"),
    "recall": (["--n", "2"], "2 facts instead of 100 (knockout and patching on both instead of 20): every "
                                 "knockout window, layer and head is still measured"),
    "patchscope eval": (["--n", "10"], "10 countries instead of 50: every layer, the target prompt and the direct "
                                       "reading remain"),
    "caa": (["--limit", "8"], "8 A/B questions (4 for the vectors, 4 held out) instead of 48: every layer and "
                              "multiplier remains"),
    "attribute evaluate": (["--n", "1", "--sanity", "1", "--tasks", "ioi"],
                           "1 IOI prompt (and 1 for the sanity checks) instead of 100 per task set; the factual and "
                           "induction sets go through the same erasure code (tests/test_faithfulness.py)"),
}
# `lens train --tokens` is required: 1024 is its smallest budget (one step of 8 contexts × 128 tokens).

# Gemma 3 270M: the commands that read one prompt or the weights (its 262k vocabulary makes sweeps slow).
GEMMA = [
    ("dla", ["--prompt", IOI, "--target", " Mary"], "DLA of logit"),
    ("lens", ["--prompt", IOI], "Logit lens at position"),
    ("flow", ["--prompt", IOI], "Route into position"),
    ("project", ["--head", "9.2"], "Head 9.2 OV circuit"),
    ("patchscope", ["--source", IOI, "--layer", "5"], "Patchscope"),
    ("steer", _STEER, "steered (actadd, layer 6"),
]


def cli_commands() -> set[str]:
    """Every command of the CLI: leaves of the command tree, and groups that run a method themselves
    (`lens --prompt ...`)."""
    import typer

    found = set()

    def walk(command, path):
        subs = getattr(command, "commands", None)
        if subs is None or (path and command.params):
            found.add(" ".join(path))
        for name, sub in (subs or {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def test_every_command_has_a_case():
    assert {c[0] for c in CASES} | set(NOT_RUN) == cli_commands()
    assert set(SIZE) <= {c[0] for c in CASES} and not set(NOT_RUN) & {c[0] for c in CASES}


@pytest.fixture(scope="module")
def loaded(smollm):
    return {None: smollm, "smollm2-135m": smollm}


@pytest.fixture(autouse=True)
def _memoised_load(loaded, monkeypatch):
    real = lmscope.load

    def load(spec=None, **kwargs):
        if spec not in loaded:
            loaded[spec] = real(spec, **kwargs)
        return loaded[spec]

    monkeypatch.setattr(lmscope, "load", load)


def _run(args, folder, monkeypatch):
    monkeypatch.chdir(folder)        # outputs (demo's ./lmscope-demo, --out lens, ...) land in the test's folder
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{args}: exit {res.exit_code}\n{res.output[-3000:]}\n{res.exception!r}"
    return " ".join(res.output.split())      # rich wraps long lines at spaces: compare with spaces normalised


def _args(command: str, args: list[str], sae: str = "") -> list[str]:
    return [*command.split(), *(a.replace("{SAE}", sae) for a in args), *SIZE.get(command, ((), ""))[0]]


@pytest.fixture(scope="module")
def trained_sae(tmp_path_factory, loaded):
    """`sae train` with its required options (and the size of SIZE), once: (SAE folder, output)."""
    folder = tmp_path_factory.mktemp("defaults")
    (command, args, _), = [c for c in CASES if c[0] == "sae train"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lmscope, "load", lambda spec=None, **kw: loaded[spec])
        out = _run(_args(command, args), folder, mp)
    return folder / "sae", out


def _id(case) -> str:
    return f"{case[0]} {case[1][0]}" if case[0] == "project" else case[0]


@pytest.mark.real
@pytest.mark.parametrize("command,args,expect", CASES, ids=[_id(c) for c in CASES])
def test_default_model(command, args, expect, tmp_path, monkeypatch, request):
    if command.startswith("sae "):
        sae, out = request.getfixturevalue("trained_sae")
        if command != "sae train":
            out = _run(_args(command, args, str(sae)), tmp_path, monkeypatch)
    else:
        if command == "clamp plot":
            _run(_args("clamp run", []), tmp_path, monkeypatch)
        out = _run(_args(command, args), tmp_path, monkeypatch)
    assert expect in out, out[-2000:]


@pytest.mark.real
def test_project_default_tokens_fit_the_model(smollm, tmp_path, monkeypatch):
    """The bug behind this file: ' 1' is two tokens for SmolLM2, and it was in the default token list."""
    import json

    assert len(smollm.tokenizer.encode(" 1", add_special_tokens=False)) == 2
    _run(["project", "--head", "23.3", "--json", "ov.json"], tmp_path, monkeypatch)
    labels = json.loads((tmp_path / "ov.json").read_text())["axes"][0]["labels"]
    assert labels and all(len(smollm.tokenizer.encode(t, add_special_tokens=False)) == 1 for t in labels)


@pytest.mark.real
@pytest.mark.parametrize("command,args,expect", GEMMA, ids=[_id(c) for c in GEMMA])
def test_gemma3(command, args, expect, tmp_path, monkeypatch):
    from lmscope.paths import find_package_dir
    from lmscope.models.registry import BUILTIN

    if find_package_dir(BUILTIN["gemma3-270m"].module) is None:
        pytest.skip(f"needs {BUILTIN['gemma3-270m'].install}")
    out = _run([*_args(command, args), "--model", "gemma3-270m"], tmp_path, monkeypatch)
    assert expect in out, out[-2000:]
