"""The README's Python examples run as written (one namespace, in order: the quick tour, then one example
per method family) on the real default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_every_family_has_a_python_example():
    text = "\n".join(python_blocks())
    for family in ("attribution", "localization", "decoding", "data", "sae"):
        assert f"from lmscope.{family} import" in text, family


@pytest.mark.real
def test_readme_python_examples_run(smollm, monkeypatch, tmp_path):
    import lmscope

    monkeypatch.chdir(tmp_path)  # the quick tour writes dla.html, dla.png, dla.json/.safetensors
    monkeypatch.setattr(lmscope, "load", lambda spec=None, **kw: smollm)  # the fixture's prepared model
    namespace: dict = {}
    blocks = python_blocks()
    assert len(blocks) >= 6
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)  # noqa: S102
