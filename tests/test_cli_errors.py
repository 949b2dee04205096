"""Bad invocations of every command: exit code 2, one line that names the problem and the fix, no
traceback, and nothing written.

Each case either fails before any model is loaded or on a tiny random model saved to disk, so the
whole table runs in seconds. Errors of click's own parsing (an unknown command or option, a missing
required option, a non-integer count) follow the same contract: one line, and the `--help` to run.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_tiny
from typer.testing import CliRunner

from lmscope.cli.main import app
from lmscope.results import Axis, Result
from lmscope.sae import make_sae, save_sae

P = "when Mary and John went to the store John gave a drink to"      # 13 tokens for the tiny model
C = "when John and Mary went to the store Mary gave a drink to"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: the tiny model, inputs that are wrong in one way each, and room for outputs."""
    root = tmp_path_factory.mktemp("cli_errors")
    model = make_tiny("llama")
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n\nun autre caf\xe9".encode("latin-1"))
    (root / "blank.txt").write_text("\n\n   \n")
    (root / "a-file").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "bad-lens").mkdir()
    (root / "bad-lens" / "tuned_lens.json").write_text("{not json")
    (root / "bad-lens" / "tuned_lens.safetensors").write_bytes(b"\x00")
    save_sae(make_sae("topk", d_in=16, d_sae=32, k=4, site="blocks.1.resid_post"), root / "narrow-sae")
    for name, doc in (("not-a-result", '{"a": 1}'), ("other-result", None)):
        folder = save_sae(make_sae("topk", d_in=32, d_sae=48, k=4, site="blocks.1.resid_post"), root / name)
        if doc is None:
            Result(torch.zeros(2), (Axis("layer", ("0", "1")),), "dla", "tiny").save_json(folder / "eval.json")
        else:
            (folder / "eval.json").write_text(doc)
    return root


# "{W}" is the workspace folder (see the ws fixture); every case runs with the tiny model or fails before loading.
_M = ["--model", "{W}/model"]
_DLA = ["dla", "--prompt", P, "--target", "Mary"]
_PAIR = ["--clean", P, "--corrupt", C, "--target", "Mary", "--foil", "John"]
_STEER = ["steer", "--positive", "yes", "--negative", "no", "--prompt", P]
CASES = [
    # models and sites
    ("unknown model", [*_DLA, "--model", "no-such-model"], r"Unknown model 'no-such-model'.*see `lmscope models`"),
    ("missing model folder", [*_DLA, "--model", "/nonexistent/model"], r"No such file or folder.*Built-in models"),
    ("bad --by", [*_DLA, "--by", "token", *_M], r"by='token'.*use one of layer, head, neuron"),
    ("bad patch site", ["patch", *_PAIR, "--site", "bogus", *_M], r"site='bogus' is not a choice: use one of resid_pre"),
    ("bad sae site", ["sae", "train", "--arch", "topk", "--site", "bogus", "--layer", "1", "--out",
                      "{W}/o-site", *_M], r"Unknown site kind 'bogus'.*Valid kinds"),
    # layers, heads and positions out of range
    ("position out of range", [*_DLA, "--position", "40", *_M],
     r"Position 40 is out of range: the prompt has 13 tokens.*Give a position in that range"),
    ("flow position", ["flow", "--prompt", P, "--position", "-99", *_M], r"Position -99 is out of range"),
    ("patchscope layer", ["patchscope", "--source", P, "--layer", "7", *_M],
     r"Layer 7 is out of range: the model has 3 layers.*Give a layer"),
    ("patchscope source position", ["patchscope", "--source", P, "--layer", "1", "--position", "40",
                                    "--target-position", "0", *_M], r"Source position 40 is out of range"),
    ("probe layers", ["probe", "--dataset", "sst2", "--layers", "0-9", "--limit", "20", *_M],
     r"Layer 3 is out of range"),
    ("steer layer", [*_STEER, "--layer", "9", *_M], r"Layer 9 is out of range"),
    ("project head", ["project", "--head", "1.9", *_M], r"Head 9 is out of range.*4 heads per layer"),
    ("sae layer", ["sae", "train", "--arch", "topk", "--layer", "9", "--out", "{W}/o-layer", *_M],
     r"Layer 9 is out of range in 'blocks\.9\.resid_post'"),
    # tokens and prompts
    ("multi-token target", ["dla", "--prompt", P, "--target", "Mary John", *_M],
     r"'Mary John' is not a single token.*splits into 2 tokens"),
    ("empty prompt", ["dla", "--prompt", " ", "--target", "Mary", *_M], r"Empty prompt: give"),
    ("misaligned pair", ["patch", "--clean", P, "--corrupt", "when Mary went", "--target", "Mary", "--foil",
                         "John", *_M], r"Pair 0: the clean prompt has 13 tokens and the corrupted one 3"),
    ("absent subject", ["trace", "--prompt", P, "--subject", "Bob", *_M], r"The subject 'Bob' does not occur"),
    ("bad head spec", ["project", "--head", "x", *_M], r"--head 'x': write LAYER\.INDEX"),
    ("head and neuron", ["project", "--head", "1.2", "--neuron", "1.3"], r"Give exactly one of --head"),
    # options with a fixed set of values
    ("unknown method", ["attribute", "--prompt", P, "--method", "magic"], r"--method 'magic' is unknown; use one"),
    ("unknown task", ["atp", "--task", "nope"], r"task='nope': choose one of ioi, induction"),
    ("half a pair", ["atp", "--clean", P], r"Give --clean, --corrupt and --target .*or --task ioi"),
    ("unknown node", ["atp", "--task", "ioi", "--node", "bogus"], r"node='bogus' is not a choice: use one of head"),
    ("unknown steer method", [*_STEER, "--layer", "1", "--method", "x"], r"--method 'x': use actadd or mean"),
    ("unknown arch", ["sae", "train", "--arch", "relu6", "--out", "{W}/o-arch"],
     r"Unknown SAE architecture 'relu6'.*use one of"),
    # negative or absurd counts
    ("zero IG steps", ["attribute", "--prompt", P, "--target", "Mary", "--steps", "0", *_M],
     r"needs at least 1 step"),
    ("negative generate", ["attribute", "--prompt", P, "--generate", "-1", *_M], r"--generate -1: give a positive number of tokens"),
    ("zero samples", ["trace", "--prompt", P, "--subject", "Mary", "--samples", "0", *_M],
     r"--samples and --window must be positive"),
    ("too many samples", ["trace", "--prompt", P, "--subject", "Mary", "--samples", "100000"],
     r"--samples 100000: give at most 256 noised copies"),
    ("absurd window", ["trace", "--prompt", P, "--subject", "Mary", "--kind", "mlp", "--window", "50", *_M],
     r"window=50: restore between 1 and 3"),
    ("negative n", ["circuit", "--n", "-3", *_M], r"n must be at least 1"),
    ("fraction above 1", ["circuit", "--fraction", "2"], r"--fraction 2\.0: give a fraction in \(0, 1\]"),
    ("zero edges", ["circuit", "--edges", "0"], r"--edges 0: give a positive number of edges"),
    ("threshold above 1", ["flow", "--prompt", P, "--threshold", "1.5"], r"strictly between 0 and 1"),
    ("app port out of range", ["app", "--port", "70000"], r"--port 70000: give a port from 0 to 65535"),
    ("k above vocabulary", ["lens", "--prompt", P, "--k", "100000", *_M], r"100000 top tokens per layer: give a "
                                                                          r"whole number from 1 to 80"),
    ("negative k", ["project", "--neuron", "1.5", "--k", "-1", *_M], r"-1 top tokens: give a whole number"),
    ("zero patchscope k", ["patchscope", "--source", P, "--layer", "1", "--k", "0", *_M], r"--k must be positive"),
    ("one fold", ["probe", "--dataset", "sst2", "--folds", "1"], r"folds=1: cross-validation needs at least 2"),
    ("zero new tokens", [*_STEER, "--layer", "1", "--max-new-tokens", "0"], r"--max-new-tokens must be at least 1"),
    ("negative lens tokens", ["lens", "train", "--tokens", "-5", "--out", "{W}/o-lens"],
     r"--tokens, --lstsq-tokens, --eval-tokens and --ridge must not be negative"),
    ("zero eval tokens", ["lens", "eval", "--tokens", "0"], r"--tokens must be positive"),
    ("zero latents", ["sae", "train", "--arch", "topk", "--latents", "0", "--layer", "1", "--out",
                      "{W}/o-latents", *_M], r"--latents 0: give at least 1"),
    ("negative sae tokens", ["sae", "train", "--arch", "topk", "--tokens", "-1", "--layer", "1", "--out",
                             "{W}/o-tokens", *_M], r"--tokens -1: give at least 1"),
    ("zero contexts", ["sae", "eval", "{W}/narrow-sae", "--contexts", "0"], r"--contexts 0: give 1 or more"),
    # click's own parsing
    ("unknown command", ["dal", "--prompt", P], r"No such command 'dal'\. Did you mean 'dla'\? Run `lmscope --help`"),
    ("unknown subcommand", ["sae", "evaluate", "{W}/narrow-sae"], r"No such command 'evaluate'.* Run `lmscope sae "
                                                                   r"--help`"),
    ("unknown option", [*_DLA, "--layer", "3"], r"No such option: --layer.*Run `lmscope dla --help`"),
    ("missing required option", ["lens", "train", "--out", "{W}/o-req"],
     r"Missing option '--tokens': KL fine-tuning tokens.*Run `lmscope lens train --help`"),
    ("missing argument", ["sae", "eval"], r"Missing argument 'SAE_DIR': SAE folder.*Run `lmscope sae eval --help`"),
    ("option without its value", ["dla", "--prompt"], r"Option '--prompt' requires an argument\. Run `lmscope dla"),
    ("non-integer count", ["trace", "--prompt", P, "--subject", "Mary", "--samples", "many"],
     r"Invalid value for '--samples'.*Run `lmscope trace --help`"),
    ("unknown option of models", ["models", "--all"], r"No such option: --all.*Run `lmscope models --help`"),
    # corpora
    ("non-UTF-8 corpus", ["lens", "train", "--tokens", "4096", "--out", "{W}/o-c1", "--corpus",
                          "{W}/latin1.txt"], r"latin1\.txt is not UTF-8 text.*convert it"),
    ("empty corpus", ["lens", "train", "--tokens", "4096", "--out", "{W}/o-c2", "--corpus",
                      "{W}/blank.txt"], r"has no documents; give a file or folder with text"),
    ("missing corpus", ["lens", "eval", "--corpus", "{W}/missing.txt"], r"missing\.txt is not a file or "
                                                                              r"folder\. Give 'default'"),
    ("missing dataset", ["probe", "--dataset", "{W}/missing.csv"], r"neither a built-in labelled set"),
    # folders and files that are not what they should be
    ("folder is not a lens", ["lens", "--prompt", P, "--kind", "tuned", "--lens", "{W}/empty"],
     r"holds no tuned lens.*lmscope lens train"),
    ("broken lens", ["lens", "eval", "--lens", "{W}/bad-lens"], r"is not a readable tuned lens.*train it"),
    ("folder is not an SAE", ["sae", "eval", "{W}/empty"], r"is not a readable SAE folder: cfg\.json is "
                                                                 r"missing.*re-train"),
    ("file is not an SAE", ["sae", "features", "{W}/a-file", "--html", "{W}/f.html"],
     r"is a file, not a folder"),
    ("wrong-width SAE", ["sae", "eval", "{W}/narrow-sae", *_M],
     r"reads 16-wide activations but blocks\.1\.resid_post .* is 32 wide.*trained on this model"),
    ("not an activation store", ["sae", "train", "--arch", "topk", "--store", "{W}/empty", "--out",
                                 "{W}/o-store"], r"is not an activation store"),
    ("JSON that is not a result", ["sae", "compare", "{W}/not-a-result"],
     r"eval\.json is not a readable evaluation result; delete it, or write it again with `lmscope sae eval"),
    ("result of another kind", ["sae", "compare", "{W}/other-result"],
     r"holds a 'dla' result, not an SAE evaluation"),
    # outputs that cannot be written (checked before any work)
    ("output under a file", [*_DLA, "--json", "{W}/a-file/x.json"],
     r"--json .*x\.json cannot be written: .*a-file is a file, not a folder"),
    # stands for a read-only folder: /proc refuses new files even to root (chmod does not bind root)
    ("read-only output folder", [*_DLA, "--html", "/proc/lmscope-out/x.html"],
     r"--html /proc/lmscope-out/x\.html cannot be written: the folder /proc is read-only"),
    ("output is a folder", [*_DLA, "--png", "{W}/empty"], r"--png .*empty is a folder; give a file path"),
    ("--out is a file", ["demo", "--out", "{W}/a-file"], r"--out .*a-file is a file, not a folder"),
    ("sae --out is a file", ["sae", "train", "--arch", "topk", "--out", "{W}/a-file"],
     r"--out .*a-file is a file, not a folder"),
    ("features html in /proc", ["sae", "features", "{W}/narrow-sae", "--html", "/proc/f.html"],
     r"read-only"),
]


def _listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_case_table_is_broad():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    commands = {" ".join(a[:2]) if a[0] in ("sae", "lens") and a[1] in ("train", "eval", "features", "compare")
                else a[0] for _, a, _ in CASES}
    assert commands >= {"dla", "attribute", "patch", "trace", "atp", "circuit", "flow", "lens", "lens train",
                        "lens eval", "patchscope", "probe", "steer", "project", "sae train", "sae eval",
                        "sae features", "sae compare", "demo"}


@pytest.mark.parametrize("name,args,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_invocation(ws, name, args, expected):
    args = [a.replace("{W}", str(ws)) for a in args]
    before = _listing(ws)
    res = CliRunner().invoke(app, args)
    out = res.output
    assert res.exit_code == 2, f"{name}: exit {res.exit_code}\n{out}\n{res.exception!r}"
    assert isinstance(res.exception, SystemExit) and "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: not one line:\n{out}"
    assert re.search(expected, lines[0]), f"{name}: {lines[0]!r} does not match {expected!r}"
    assert _listing(ws) == before, f"{name}: the workspace changed"
