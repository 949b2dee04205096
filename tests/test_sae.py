"""SAE architectures, losses, training (resume, DDP), files and errors on synthetic data (CPU, ~1-2 min)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors import safe_open
from safetensors.torch import load_file

from lmscope.errors import InputError
from lmscope.sae import (JumpReLUSAE, TensorSource, TrainConfig, TrainingError, geometric_median,
                         load_sae, make_sae, save_sae, train)
from lmscope.sae.jumprelu import JumpReLUFn, StepFn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids spin contention on a shared machine (and fixes float summation order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic(n=40000, d=32, m=64, k=3, seed=42):
    """Activations made of k of m known unit directions with magnitudes in [0.5, 1.5], plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, m, generator=g).argsort(1)[:, :k]
    f = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return f @ D + 0.1, D


def mean_max_cos(sae, D):
    W = sae.W_dec.detach()
    W = W / W.norm(dim=1, keepdim=True)
    return (D @ W.T).max(1).values.mean().item()


ARCH_KW = {"relu": dict(l1=1.5), "gated": dict(l1=3.0), "topk": dict(k=3), "jumprelu": dict(l0=1.0)}


@pytest.mark.parametrize("arch", list(ARCH_KW))
def test_recovers_known_dictionary(arch):
    x, D = synthetic()
    sae = make_sae(arch, d_in=32, d_sae=128, **ARCH_KW[arch])
    before = mean_max_cos(sae, D)
    state = train(sae, TensorSource(x), TrainConfig(tokens=len(x) * 3, batch_size=256, lr=3e-3, checkpoint_every=0,
                                                    dead_tokens=5000), progress=False)
    score = mean_max_cos(sae, D)
    assert before < 0.7  # random init does not already match
    assert score >= 0.9, (arch, score, state.history[-1])
    assert state.history[-1]["l0"] < 12  # sparse: the data has 3 active features per row


# ---------------------------------------------------------------------------------------------- losses

def _batch(d=8, n=5, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def _perturb(sae):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_relu_losses_match_formula():
    x = _batch()
    for decoder in ("weighted", "unit_norm"):
        sae = make_sae("relu", d_in=8, d_sae=12, l1=0.7, decoder=decoder)
        _perturb(sae)
        total = 0.0
        with torch.no_grad():
            total = _relu_direct(sae, x, decoder)
        assert sae.loss(x).loss.item() == pytest.approx(total / len(x), rel=1e-5)


def _relu_direct(sae, x, decoder):
    total = 0.0
    if True:
        for xb in x:   # one example at a time, sums written out
            xin = xb - sae.b_dec if decoder == "unit_norm" else xb
            f = [max(0.0, float(sum(xin[j] * sae.W_enc[j, i] for j in range(8)) + sae.b_enc[i])) for i in range(12)]
            xh = sae.b_dec.detach().clone()
            pen = 0.0
            for i in range(12):
                xh += f[i] * sae.W_dec[i].detach()
                pen += f[i] * (float(sae.W_dec[i].norm()) if decoder == "weighted" else 1.0)
            total += float(((xb - xh) ** 2).sum()) + 0.7 * pen
    return total


def test_gated_loss_matches_formula():
    x = _batch()
    sae = make_sae("gated", d_in=8, d_sae=12, l1=0.4)
    _perturb(sae)
    xt = x - sae.b_dec
    pg = xt @ sae.W_enc + sae.b_gate
    pm = xt @ (sae.W_enc * sae.r_mag.exp()[None]) + sae.b_mag
    f = (pg > 0).float() * torch.relu(pm)
    rec = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(1)
    aux = ((torch.relu(pg) @ sae.W_dec + sae.b_dec - x) ** 2).sum(1)
    want = (rec + 0.4 * torch.relu(pg).sum(1) + aux).mean()
    assert sae.loss(x).loss.item() == pytest.approx(want.item(), rel=1e-5)


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


def test_gated_gradient_flow():
    """Sparsity reaches only the gate; the auxiliary term trains the gate but not the decoder."""
    x = _batch()
    sae = make_sae("gated", d_in=8, d_sae=12, l1=0.9)
    _perturb(sae)
    sae.loss(x).loss.backward()
    full = {n: _grad(p) for n, p in sae.named_parameters()}
    sae.zero_grad()
    f = sae.encode_n(x)   # reconstruction term alone
    ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean().backward()
    rec_only = {n: _grad(p) for n, p in sae.named_parameters()}
    for name in ("r_mag", "b_mag", "W_dec"):   # magnitude path and decoder: reconstruction only
        assert torch.allclose(full[name], rec_only[name], atol=1e-6), name
    assert rec_only["b_gate"].abs().max() == 0           # Heaviside: no reconstruction gradient into the gate
    assert full["b_gate"].abs().max() > 0                # ...the gate learns from the L1 and auxiliary terms


def test_topk_loss_and_auxk_match_formula():
    x = _batch(n=6)
    sae = make_sae("topk", d_in=8, d_sae=12, k=3, k_aux=2)
    _perturb(sae)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[0, 4, 5, 9]] = True
    out = sae.loss(x, dead_F=dead, mse_scale=0.37)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    xh, eh = [], []
    for row in pre:
        keep = row.argsort(descending=True)[:3]
        xh.append(sum(torch.relu(row[i]) * sae.W_dec[i] for i in keep) + sae.b_dec)
        dead_idx = dead.nonzero().flatten()
        top_dead = dead_idx[row[dead_idx].argsort(descending=True)[:2]]
        eh.append(sum(torch.relu(row[i]) * sae.W_dec[i] for i in top_dead))
    xh, eh = torch.stack(xh), torch.stack(eh)
    e = x - xh
    want = 0.37 * ((x - xh) ** 2).sum(1).mean() + (1 / 32) * (((eh - e) ** 2).sum(1) / (e ** 2).sum(1)).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert torch.allclose(sae.encode_n(x) @ sae.W_dec + sae.b_dec, xh, atol=1e-5)
    assert ((out.f > 0).sum(1) <= 3).all()


def test_topk_auxk_target_is_detached():
    x = _batch(n=2)
    sae = make_sae("topk", d_in=8, d_sae=12, k=2, k_aux=4)
    _perturb(sae)
    used = sae.loss(x).f.detach().gt(0).any(0)
    dead = ~used
    assert used.any() and dead.sum() >= 4
    aux_only = sae.loss(x, dead_F=dead).loss - sae.loss(x).loss   # the AuxK term alone
    aux_only.backward()
    # e = x − x̂ is detached: the decoder rows of the latents that made x̂ get no gradient from AuxK
    assert sae.W_dec.grad[used].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().max() > 0


def test_jumprelu_loss_and_pseudo_derivatives():
    x = _batch()
    sae = make_sae("jumprelu", d_in=8, d_sae=12, l0=0.3, bandwidth=0.5, threshold_init=0.4)
    _perturb(sae)
    z = x @ sae.W_enc + sae.b_enc
    th = sae.threshold
    f = z * (z > th).float()
    want = (((f @ sae.W_dec + sae.b_dec) - x) ** 2).sum(1).mean() + 0.3 * (z > th).float().sum(1).mean()
    assert sae.loss(x).loss.item() == pytest.approx(want.item(), rel=1e-5)
    # straight-through estimators against the paper's formulas (rectangle kernel, bandwidth ε)
    eps = 0.5
    zz = z.detach().requires_grad_(True)
    tt = th.detach().clone().requires_grad_(True)
    g = torch.randn(zz.shape, generator=torch.Generator().manual_seed(5))
    (JumpReLUFn.apply(zz, tt, eps) * g).sum().backward()
    K = ((zz - tt).abs() / eps < 0.5).float().detach()
    assert torch.allclose(zz.grad, (zz > tt).float() * g)
    assert torch.allclose(tt.grad, (-(tt / eps) * K * g).sum(0).detach(), atol=1e-5)
    zz.grad = tt.grad = None
    (StepFn.apply(zz, tt, eps) * g).sum().backward()
    assert zz.grad is None
    assert torch.allclose(tt.grad, (-(1 / eps) * K * g).sum(0), atol=1e-5)
    assert K.sum() > 0   # the check above is not vacuous


def test_unit_norm_projection_and_renormalisation():
    sae = make_sae("topk", d_in=8, d_sae=12, k=2)
    sae.W_dec.grad = torch.randn(12, 8)
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalise_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(12), atol=1e-6)


def test_geometric_median():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(x)
    assert gm.norm() < 1.0                                       # robust to the outlier, unlike the mean
    dist = lambda p: (x - p).norm(dim=1).sum()                  # noqa: E731
    for dp in ([0.01, 0], [0, 0.01], [-0.01, 0], [0, -0.01]):
        assert dist(gm) <= dist(gm + torch.tensor(dp)) + 1e-6


def test_scale_folding_and_files_roundtrip(tmp_path):
    x, _ = synthetic(n=4096)
    for arch, kw in ARCH_KW.items():
        sae = make_sae(arch, d_in=32, d_sae=64, site="blocks.1.resid_post", model="m", **kw)
        train(sae, TensorSource(x * 7.0), TrainConfig(tokens=2048, batch_size=256, checkpoint_every=0),
              progress=False)
        assert sae.scale.item() != pytest.approx(1.0)
        folder = save_sae(sae, tmp_path / arch)
        cfg = json.loads((folder / "cfg.json").read_text())
        tensors = load_file(folder / "sae_weights.safetensors")
        assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch)
        assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
        assert tensors["W_enc"].shape == (32, 64) and tensors["W_dec"].shape == (64, 32)
        assert ("threshold" in tensors) == (arch == "jumprelu")
        assert ("b_gate" in tensors and "b_enc" not in tensors) == (arch == "gated")
        back = load_sae(folder)
        assert back.scale.item() == 1.0 and type(back) is type(sae)
        xs = x[:50] * 7.0
        assert torch.allclose(back.encode(xs), sae.encode(xs), atol=1e-4)
        assert torch.allclose(back(xs), sae(xs), atol=1e-3)


def test_saelens_style_file_written_by_hand_loads(tmp_path):
    """A folder with SAELens's names (as SAELens writes them) loads with the arithmetic SAELens uses."""
    g = torch.Generator().manual_seed(0)
    W_enc, W_dec = torch.randn(16, 40, generator=g), torch.randn(40, 16, generator=g)
    b_enc, b_dec, th = torch.randn(40, generator=g), torch.randn(16, generator=g), torch.rand(40, generator=g)
    from safetensors.torch import save_file
    (tmp_path / "j").mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": th},
              tmp_path / "j" / "sae_weights.safetensors")
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": 16, "d_sae": 40, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.12.hook_resid_post"}}))
    sae = load_sae(tmp_path / "j")
    assert isinstance(sae, JumpReLUSAE) and sae.cfg.site == "blocks.12.resid_post"
    x = torch.randn(7, 16, generator=g)
    pre = x @ W_enc + b_enc
    f = torch.relu(pre) * (pre > th)
    assert torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(sae(x), f @ W_dec + b_dec, atol=1e-4)


def _saelens():
    """SAELens (pip sae-lens, the bench extra), imported with its own import-time warnings silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("sae_lens")


@pytest.mark.parametrize("arch, kw", [("relu", {"decoder": "unit_norm"}), ("relu", {}), ("gated", {}),
                                      ("topk", {"k": 5}), ("jumprelu", {})])
def test_files_load_in_saelens_and_back(tmp_path, arch, kw):
    """An SAE saved here loads in SAELens with the same encode/decode; one saved by SAELens loads here."""
    sl = _saelens()
    g = torch.Generator().manual_seed(5)
    sae = make_sae(arch, d_in=16, d_sae=40, site="blocks.3.resid_post", model="smollm2-135m", **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        sae.scale.fill_(1.7)                     # the file folds the input scale in
    x = 3 * torch.randn(64, 16, generator=g)
    theirs = sl.SAE.load_from_disk(save_sae(sae, tmp_path / "ours"))
    f_ours, f_theirs = sae.encode(x), theirs.encode(x).detach()
    assert (f_ours > 0).sum() > 0 and torch.equal(f_ours > 0, f_theirs > 0)
    assert torch.allclose(f_theirs, f_ours, atol=1e-4)
    assert torch.allclose(theirs.decode(f_theirs).detach(), sae.decode(f_ours), atol=1e-4)

    cls_cfg = {"relu": ("StandardSAE", "StandardSAEConfig"), "gated": ("GatedSAE", "GatedSAEConfig"),
               "topk": ("TopKSAE", "TopKSAEConfig"), "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig")}[arch]
    extra = {"k": 5} if arch == "topk" else {}
    native = getattr(sl, cls_cfg[0])(getattr(sl, cls_cfg[1])(d_in=16, d_sae=40, **extra))
    with torch.no_grad():
        for name, p in native.named_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_()
    native.save_model(tmp_path / "theirs")
    back = load_sae(tmp_path / "theirs")
    assert back.cfg.arch == arch
    f_native, f_back = native.encode(x).detach(), back.encode(x)
    assert (f_native > 0).sum() > 0 and torch.equal(f_native > 0, f_back > 0)
    assert torch.allclose(f_back, f_native, atol=1e-4)
    assert torch.allclose(back.decode(f_back), native.decode(f_native).detach(), atol=1e-4)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="between 1 and the number of latents"):
        make_sae("topk", d_in=8, d_sae=16, k=17)
    with pytest.raises(InputError, match="Unknown SAE architecture"):
        make_sae("relu6", d_in=8, d_sae=16)
    sae = make_sae("topk", d_in=8, d_sae=16, k=2)
    with pytest.raises(InputError, match="8-wide"):
        sae.encode(torch.randn(3, 9))
    with pytest.raises(InputError, match="wide"):
        train(sae, TensorSource(torch.randn(1000, 9)), TrainConfig(tokens=512, batch_size=256), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_sae(tmp_path / "bad")
    folder = save_sae(sae, tmp_path / "ok")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="corrupted"):
        load_sae(folder)


class _Poisoned(TensorSource):
    """Batch 12 of the training stream holds a NaN."""

    def batches(self, batch_size, shuffle=True, seed=0, epochs=1):
        for i, b in enumerate(super().batches(batch_size, shuffle, seed, epochs)):
            yield b.clone().fill_(float("nan")) if i == 12 and seed == 0 else b


def _checkpoint(path):
    """The JSON part and the tensors of an SAE checkpoint, read without unpickling anything."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lmscope"]), {k: f.get_tensor(k) for k in f.keys()}


def test_failed_run_keeps_last_good_checkpoint(tmp_path):
    x, _ = synthetic(n=4096)
    sae = make_sae("relu", d_in=32, d_sae=64)
    cfg = TrainConfig(tokens=4096 * 2, batch_size=128, checkpoint_every=5)
    with pytest.raises(TrainingError, match=r"NaN or infinite values \(128 of 128 rows in the batch of step 12\); the "
                                            r"data is broken, not the training settings.*last good checkpoint"):
        train(sae, _Poisoned(x), cfg, tmp_path, progress=False)
    doc, tensors = _checkpoint(tmp_path / "checkpoint.safetensors")
    assert doc["state"]["step"] == 10
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("sae."))
    assert not (tmp_path / "sae_weights.safetensors").exists()
    (tmp_path / "checkpoint.safetensors").write_bytes(b"corrupt")
    with pytest.raises(TrainingError, match="corrupted"):
        train(make_sae("relu", d_in=32, d_sae=64), TensorSource(x), cfg, tmp_path, progress=False)


def test_non_finite_data_and_loss_are_told_apart(tmp_path):
    x, _ = synthetic(n=4096)
    bad = x.clone()
    bad[7, 3] = float("inf")
    cfg = TrainConfig(tokens=4096, batch_size=128, checkpoint_every=0)
    with pytest.raises(TrainingError, match=r"\(1 of 4096 rows in the initial sample\).*not the training settings"):
        train(make_sae("relu", d_in=32, d_sae=64), TensorSource(bad), cfg, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
    # finite data, a learning rate that blows the weights up: the message blames the settings
    with pytest.raises(TrainingError, match="Lower the learning rate"):
        train(make_sae("relu", d_in=32, d_sae=64), TensorSource(x),
              TrainConfig(tokens=4096, batch_size=128, lr=1e30, grad_clip=0, checkpoint_every=0), progress=False)


class _Mkdir:
    """Unpickling this object runs os.mkdir(path): a stand-in for any code in a tampered file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoints_are_never_unpickled(tmp_path):
    x, _ = synthetic(n=2048)
    cfg = TrainConfig(tokens=1024, batch_size=128, checkpoint_every=0)
    ran = tmp_path / "code-ran"
    payload = pickle.dumps(_Mkdir(ran))
    pickle.loads(payload)                 # the payload is live: unpickling it runs code
    assert ran.is_dir()
    ran.rmdir()
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"sae": _Mkdir(ran)}, old / "checkpoint.pt")   # a tampered checkpoint of the earlier format
    with pytest.raises(TrainingError, match="pickled checkpoint of an older lmscope; it is not read"):
        train(make_sae("relu", d_in=32, d_sae=64), TensorSource(x), cfg, old, progress=False)
    new = tmp_path / "new"
    new.mkdir()
    (new / "checkpoint.safetensors").write_bytes(payload)
    with pytest.raises(TrainingError, match="corrupted or not an lmscope SAE checkpoint"):
        train(make_sae("relu", d_in=32, d_sae=64), TensorSource(x), cfg, new, progress=False)
    assert not ran.exists()
    # the format holds the whole state: a finished run's checkpoint resumes as a no-op with equal weights
    sae = make_sae("relu", d_in=32, d_sae=64)
    train(sae, TensorSource(x), cfg, tmp_path / "ok", progress=False)
    again = make_sae("relu", d_in=32, d_sae=64)
    state = train(again, TensorSource(x), cfg, tmp_path / "ok", progress=False)
    assert state.step == cfg.steps
    for (name, a), b in zip(sae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name



def test_resampling_revives_dead_latents():
    x, _ = synthetic(n=8192)
    sae = make_sae("relu", d_in=32, d_sae=64, decoder="unit_norm", l1=0.3)
    with torch.no_grad():
        sae.b_enc[:16] = -1e3                # 16 latents that can never fire
    state = train(sae, TensorSource(x), TrainConfig(tokens=8192, batch_size=256, resample_every=10,
                                                    max_resamples=1, checkpoint_every=0), progress=False)
    assert state.resamples == 1
    assert (sae.b_enc[:16] > -1e3).all()
    f = sae.encode(x[:2000])
    assert (f[:, :16] > 0).any(0).sum() >= 8   # most of them fire after resampling


# ---------------------------------------------------------------------------------------------- resume, DDP

_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from lmscope.sae import TensorSource, TrainConfig, make_sae, train
    from test_sae import resume_run
    resume_run(sys.argv[1], sys.argv[2], sys.argv[3], delay=float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
""")


RESUME_STEPS = 150


class SlowSource(TensorSource):
    """A TensorSource that waits ``delay`` s per batch, so that a run is surely killed mid-way."""

    def __init__(self, acts, delay):
        super().__init__(acts)
        self.delay = delay

    def batches(self, *args, **kwargs):
        for batch in super().batches(*args, **kwargs):
            time.sleep(self.delay)
            yield batch


def resume_run(data, out, arch, delay=0.0):
    """The run of the kill-and-resume test (also imported by its subprocess)."""
    x = torch.load(data)
    kw = dict(k=8) if arch == "topk" else dict(l1=0.5, decoder="unit_norm")
    sae = make_sae(arch, d_in=x.shape[1], d_sae=512, seed=1, **kw)
    cfg = TrainConfig(tokens=256 * RESUME_STEPS, batch_size=256, lr=1e-3, checkpoint_every=10, dead_tokens=512,
                      resample_every=25 if arch == "relu" else 0)
    train(sae, SlowSource(x, delay) if delay else TensorSource(x), cfg, out, progress=False)


def _run_script(tmp_path, *args, wait=True):
    script = tmp_path / "run_train.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE if wait else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-2000:]
    return proc


@pytest.mark.parametrize("arch", ["relu"])
def test_kill_and_resume_gives_same_weights(tmp_path, arch):
    """A real SIGKILL mid-run, then a restart: the same final weights as an uninterrupted run."""
    x, _ = synthetic(n=8192, d=64, m=256, k=4)
    torch.save(x, tmp_path / "x.pt")
    proc = _run_script(tmp_path, tmp_path / "x.pt", tmp_path / "killed", arch, 0.05, wait=False)
    resume_run(tmp_path / "x.pt", tmp_path / "ref", arch)     # the uninterrupted reference, meanwhile
    ck = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.time() + 300
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint(ck)[0]["state"]["step"]
    assert 0 < killed_at < RESUME_STEPS, "the run must be interrupted mid-way for this test to mean anything"
    assert not (tmp_path / "killed" / "sae_weights.safetensors").exists()
    _run_script(tmp_path, tmp_path / "x.pt", tmp_path / "killed", arch)
    ref = load_file(tmp_path / "ref" / "sae_weights.safetensors")
    got = load_file(tmp_path / "killed" / "sae_weights.safetensors")
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


_DDP = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from lmscope.sae import TensorSource, TrainConfig, make_sae, train
    dist.init_process_group("gloo")
    x = torch.load(sys.argv[1])
    for arch, kw in (("topk", dict(k=8)), ("relu", dict(l1=0.5, decoder="unit_norm")), ("jumprelu", {})):
        sae = make_sae(arch, d_in=x.shape[1], d_sae=1024 if arch == "topk" else 256, seed=1, **kw)
        cfg = TrainConfig(tokens=256 * 30, batch_size=256, lr=1e-3, checkpoint_every=0, dead_tokens=256,
                          resample_every=10 if arch == "relu" else 0)
        train(sae, TensorSource(x), cfg, f"{sys.argv[2]}/{arch}", progress=False)
    dist.destroy_process_group()
""")


def test_two_process_data_parallel_matches_one_process(tmp_path):
    x, _ = synthetic(n=4096, d=64, m=256, k=4)
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "ddp.py").write_text(_DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), str(tmp_path / "ddp.py"), str(tmp_path / "x.pt"),
                          str(tmp_path / "ddp")], env=env, cwd=REPO, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    for arch, kw in (("topk", dict(k=8)), ("relu", dict(l1=0.5, decoder="unit_norm")), ("jumprelu", {})):
        sae = make_sae(arch, d_in=64, d_sae=1024 if arch == "topk" else 256, seed=1, **kw)
        cfg = TrainConfig(tokens=256 * 30, batch_size=256, lr=1e-3, checkpoint_every=0, dead_tokens=256,
                          resample_every=10 if arch == "relu" else 0)
        state = train(sae, TensorSource(x), cfg, tmp_path / "one" / arch, progress=False)
        if arch == "topk":
            assert state.history[-1]["dead_frac"] > 0   # AuxK was active, so dead-latent stats were reduced
        one = load_file(tmp_path / "one" / arch / "sae_weights.safetensors")
        two = load_file(tmp_path / "ddp" / arch / "sae_weights.safetensors")
        for name in one:
            assert torch.allclose(one[name], two[name], atol=2e-5, rtol=1e-4), (arch, name,
                                                                                 (one[name] - two[name]).abs().max())


# ---------------------------------------------------------------------------------------------- training options

def test_constant_schedule_switches_warmup_and_decay_off():
    x, _ = synthetic()
    kw = dict(tokens=256 * 20, batch_size=256, lr=2e-3, checkpoint_every=0, log_every=1)
    runs = {}
    for schedule in ("warmup_decay", "constant"):
        sae = make_sae("relu", d_in=32, d_sae=64, l1=1.0)
        runs[schedule] = train(sae, TensorSource(x), TrainConfig(**kw, lr_warmup=0.2, coeff_warmup=0.2, schedule=schedule),
                               progress=False).history
    const, sched = runs["constant"], runs["warmup_decay"]
    assert len(const) == 20 and all(h["lr"] == 2e-3 and h["coeff"] == 1.0 for h in const)
    assert sched[0]["lr"] < 2e-3 and sched[-1]["lr"] < 2e-3 and sched[0]["coeff"] < 1.0  # the default still warms
    with pytest.raises(InputError, match="schedule"):
        TrainConfig(tokens=512, batch_size=256, schedule="cosine")


def test_init_keeps_own_b_dec_and_input_scale_when_asked():
    from lmscope.sae.training import init_from_data

    x, _ = synthetic(n=2048)
    x = x * 5.0 + 3.0
    b_dec = torch.linspace(-1, 1, 32)
    cfg = dict(tokens=1024, batch_size=256, init_sample=2048)  # the initial sample is all of x
    for keep_scale, keep_b in ((False, False), (True, False), (False, True), (True, True)):
        sae = make_sae("topk", d_in=32, d_sae=64, k=4)
        with torch.no_grad():
            sae.scale.fill_(0.25)
            sae.b_dec.copy_(b_dec)
        mse_scale = init_from_data(sae, TensorSource(x), TrainConfig(**cfg, init_scale=not keep_scale,
                                                                      init_b_dec=not keep_b))
        sample = x
        want_scale = 0.25 if keep_scale else float((32 / sample.pow(2).sum(1).mean()).sqrt())
        assert float(sae.scale) == pytest.approx(want_scale, rel=1e-5)
        if keep_b:
            assert torch.equal(sae.b_dec.detach(), b_dec)
        else:  # moved to the geometric median of the scaled sample
            torch.testing.assert_close(sae.b_dec.detach(), geometric_median(x * want_scale), rtol=1e-4, atol=1e-4)
        scaled = sample * want_scale
        assert mse_scale == pytest.approx(float(1 / (scaled - scaled.mean(0)).pow(2).sum(1).mean()), rel=1e-4)
    # training with both kept: the scale stays, b_dec is only moved by the optimiser
    sae = make_sae("topk", d_in=32, d_sae=64, k=4)
    with torch.no_grad():
        sae.scale.fill_(0.25)
        sae.b_dec.copy_(b_dec)
    train(sae, TensorSource(x), TrainConfig(**cfg, lr=0.0, checkpoint_every=0, init_scale=False, init_b_dec=False),
          progress=False)
    assert float(sae.scale) == 0.25 and torch.equal(sae.b_dec.detach(), b_dec)
