"""Result containers and their pictures: validation, save/load, exports, sel/top, PNG and HTML."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

from lmscope import plot
from lmscope.errors import InputError, ResultFormatError
from lmscope.results import Axis, Result

TOKENS = ("<|endoftext|>", " When", " Mary", "&amp", '"q"', "'s", "\n", "  two", "", "$x$", " 你好", "a\tb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_2d(n_layers: int = 5, tokens: tuple[str, ...] = TOKENS, seed: int = 0) -> Result:
    values = torch.randn(n_layers, len(tokens), generator=torch.Generator().manual_seed(seed))
    return Result(
        values,
        (Axis("layer", range(n_layers)), Axis("token", tokens)),
        method="logit_lens",
        model="tiny-random",
        target={"target": " Mary", "target_id": 123, "foil": " John", "position": -1},
        params={"k": 5, "norm": True},
        extras={"probs": torch.rand(n_layers, 3), "ids": torch.arange(len(tokens))},
        meta={"tokens": list(tokens), "top": [[" Mary", 0.5], [" John", 0.25]]},
    )


def make_1d(n: int = 7) -> Result:
    return Result(torch.randn(n), (Axis("component", [f"L{i}.attn" for i in range(n)]),), "dla", "tiny")


# ------------------------------------------------------------------------------- construction
def test_values_are_stored_detached_cpu_float32():
    values = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    r = Result(values, (Axis("layer", range(3)), Axis("head", range(4))), "m", "model")
    assert r.values.dtype == torch.float32 and not r.values.requires_grad and r.values.device.type == "cpu"
    assert r.axes[0].labels == ("0", "1", "2")
    assert r.shape == (3, 4) and r.axis_names == ("layer", "head")


def test_numpy_lists_and_integers_are_converted():
    from_numpy = Result(np.ones((2, 2)), (Axis("a", ["x", "y"]), Axis("b", ["u", "v"])), "m", "x")
    assert from_numpy.values.dtype == torch.float32
    ints = Result([[1, 2, 3]], (Axis("a", ["x"]), Axis("b", ["u", "v", "w"])), "m", "x")
    assert ints.values.dtype == torch.int64
    assert ints.top(1) == [(("x", "w"), 3)]


@pytest.mark.parametrize(
    "values, axes, match",
    [
        (torch.zeros(2, 3), (Axis("layer", ["0", "1"]),), "2 dimensions|shape"),
        (torch.zeros(2, 3), (Axis("layer", ["0", "1"]), Axis("token", ["a", "b"])), "axis 'token'"),
        (torch.zeros(2, 2), (Axis("a", ["0", "1"]), Axis("a", ["0", "1"])), "unique"),
        (torch.zeros(2), ("layer",), "Axis"),
    ],
)
def test_validation_errors_name_the_problem(values, axes, match):
    with pytest.raises(InputError, match=match):
        Result(values, axes, "m", "model")


def test_axis_validation():
    with pytest.raises(InputError, match="identifier"):
        Axis("my layer", ["0"])
    with pytest.raises(InputError, match="identifier"):
        Axis("value", ["0"])
    with pytest.raises(InputError, match="not a string"):
        Axis("token", "abc")
    with pytest.raises(InputError, match="str or int"):
        Axis("token", [None])


def test_params_must_be_json():
    with pytest.raises(InputError, match="JSON"):
        make_1d().__class__(torch.zeros(1), (Axis("a", ["x"]),), "m", "x", params={"f": object()})
    r = Result(torch.zeros(1), (Axis("a", ["x"]),), "m", "x", params={"t": (1, 2), "n": np.float32(0.5)})
    assert r.params == {"t": [1, 2], "n": 0.5}


def test_provenance_and_repr():
    r = make_2d()
    prov = r.provenance
    assert prov["method"] == "logit_lens" and prov["model"] == "tiny-random" and prov["params"] == r.params
    assert prov["lmscope_version"] and prov["created"]
    text = repr(r)
    assert "logit_lens" in text and "layer[5]" in text and "token[12]" in text and len(text) < 200


# ------------------------------------------------------------------------------ save and load
@pytest.mark.parametrize("suffix", ["", ".json", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    r = make_2d()
    json_path, st_path = r.save(tmp_path / f"res{suffix}")
    assert json_path == tmp_path / "res.json" and st_path == tmp_path / "res.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json", "res.safetensors"]  # no temp files left
    for name in ("res", "res.json", "res.safetensors"):
        back = Result.load(tmp_path / name)
        assert torch.equal(back.values, r.values)
        assert back.axes == r.axes
        assert back.extras.keys() == r.extras.keys()
        assert all(torch.equal(back.extras[k], r.extras[k]) for k in r.extras)
        assert (back.meta, back.target, back.params) == (r.meta, r.target, r.params)
        assert back.provenance == r.provenance


def test_json_has_required_keys_and_values(tmp_path):
    r = make_2d()
    path = r.save_json(tmp_path / "out" / "res.json")
    doc = json.loads(path.read_text(encoding="utf-8"))
    for key in ("method", "model", "axes", "values", "target", "params", "meta", "provenance"):
        assert key in doc
    assert doc["axes"] == [{"name": a.name, "labels": list(a.labels)} for a in r.axes]
    assert torch.equal(torch.tensor(doc["values"], dtype=torch.float32), r.values)
    back = Result.load(path)  # a save_json file loads too
    assert torch.equal(back.values, r.values) and torch.equal(back.extras["ids"], r.extras["ids"])


def test_json_is_strict_with_nan(tmp_path):
    values = torch.tensor([1.0, float("nan"), float("inf")])
    r = Result(values, (Axis("a", ["x", "y", "z"]),), "m", "x")
    text = r.save_json(tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["values"] == [1.0, None, None]
    assert torch.isnan(Result.load(tmp_path / "r.json").values[1])


def test_corrupt_or_missing_files_raise_result_format_error(tmp_path):
    r = make_2d()
    json_path, st_path = r.save(tmp_path / "res")
    st_path.write_bytes(b"\x00garbage")
    with pytest.raises(ResultFormatError, match="res.safetensors"):
        Result.load(tmp_path / "res")
    r.save(tmp_path / "res")
    json_path.write_text('{"method": "dla", ')
    with pytest.raises(ResultFormatError, match="res.json"):
        Result.load(tmp_path / "res")
    json_path.write_text(json.dumps({"format": "lmscope.result", "method": "dla"}))
    with pytest.raises(ResultFormatError, match="res.json"):
        Result.load(tmp_path / "res")
    json_path.unlink()
    with pytest.raises(ResultFormatError, match="res.json"):
        Result.load(tmp_path / "res")
    r.save(tmp_path / "res")
    st_path.unlink()
    with pytest.raises(ResultFormatError, match="res.safetensors"):
        Result.load(tmp_path / "res")
    with pytest.raises(ResultFormatError, match="nothing.json"):
        Result.load(tmp_path / "nothing")


def test_mismatched_pair_raises_result_format_error(tmp_path):
    make_2d().save(tmp_path / "a")
    make_1d().save(tmp_path / "b")
    (tmp_path / "b.safetensors").replace(tmp_path / "a.safetensors")
    with pytest.raises(ResultFormatError, match="a.json"):
        Result.load(tmp_path / "a")


# ------------------------------------------------------------------------- pandas, sel, top
def test_to_pandas_long_form():
    r = make_2d()
    df = r.to_pandas()
    assert len(df) == r.values.numel()
    assert list(df.columns) == ["layer", "layer_idx", "token", "token_idx", "value"]
    row = df[(df.layer_idx == 3) & (df.token_idx == 2)].iloc[0]
    assert row["layer"] == "3" and row["token"] == " Mary"
    assert row["value"] == pytest.approx(r.values[3, 2].item())
    np.testing.assert_allclose(df["value"].to_numpy(), r.values.flatten().numpy())


def test_sel_by_index_and_label():
    r = make_2d()
    last = r.sel(layer=-1)
    assert last.axis_names == ("token",) and torch.equal(last.values, r.values[-1])
    assert last.meta["selected"] == {"layer": {"index": 4, "label": "4"}}
    cell = r.sel(layer="2", token=" Mary")
    assert cell.values.ndim == 0 and cell.values.item() == r.values[2, 2].item()
    with pytest.raises(InputError, match="no axis 'head'"):
        r.sel(head=0)
    with pytest.raises(InputError, match="out of range"):
        r.sel(layer=5)
    with pytest.raises(InputError, match="not on axis"):
        r.sel(token=" Bob")
    dup = Result(torch.zeros(3), (Axis("token", ["a", "b", "a"]),), "m", "x")
    with pytest.raises(InputError, match="indices"):
        dup.sel(token="a")


@pytest.mark.parametrize("largest", [True, False])
def test_top_matches_torch(largest):
    r = make_2d()
    got = r.top(6, largest=largest)
    expected = torch.topk(r.values.flatten(), 6, largest=largest)
    assert [v for _, v in got] == pytest.approx(expected.values.tolist())
    for (labels, value), flat in zip(got, expected.indices.tolist()):
        i, j = divmod(flat, r.shape[1])
        assert labels == (r.axes[0].labels[i], r.axes[1].labels[j])
        assert value == r.values[i, j].item()
    assert len(r.top(10_000)) == r.values.numel()


def test_top_skips_nan_and_checks_k():
    r = Result(torch.tensor([float("nan"), 1.0, 3.0]), (Axis("a", ["x", "y", "z"]),), "m", "x")
    assert r.top(5) == [(("z",), 3.0), (("y",), 1.0)]
    with pytest.raises(InputError):
        r.top(0)


# --------------------------------------------------------------------------------- pictures
@pytest.mark.parametrize("make", [make_1d, make_2d])
def test_png_is_written(tmp_path, make):
    path = make().to_png(tmp_path / "pic.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_png_readable_for_thirty_layers_and_signs(tmp_path):
    r = make_2d(n_layers=30, tokens=tuple(f" tok{i}" for i in range(20)))
    assert plot.heatmap_png(r, tmp_path / "a.png", title="30 × 20 <test> $x$").read_bytes()[:8] == PNG_MAGIC
    positive = Result(torch.rand(4, 3), (Axis("layer", range(4)), Axis("head", range(3))), "m", "x")
    assert positive.to_png(tmp_path / "b.png", cmap="viridis").read_bytes()[:8] == PNG_MAGIC
    nan = Result(torch.full((2, 2), float("nan")), (Axis("a", ["x", "y"]), Axis("b", ["u", "v"])), "m", "x")
    assert nan.to_png(tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_png_refuses_three_axes(tmp_path):
    r = Result(torch.zeros(2, 3, 4), (Axis("layer", range(2)), Axis("head", range(3)), Axis("pos", range(4))), "m", "x")
    with pytest.raises(InputError, match=r"sel\(layer=0\)"):
        r.to_png(tmp_path / "x.png")
    with pytest.raises(InputError, match="sel"):
        plot.to_html(r)
    assert r._repr_html_() is None  # Jupyter falls back to repr


def test_display_label():
    assert plot.display_label(" Mary") == "␣Mary"
    assert plot.display_label("New York ") == "New York␣"
    assert plot.display_label("a\nb\tc") == "a\\nb\\tc"
    assert plot.display_label("") == '""'
    assert plot.display_label("  ") == "␣␣"
    assert plot.display_label("\x00") == "\\x00"


@pytest.mark.parametrize("make", [make_1d, make_2d])
def test_html_is_self_contained_and_escaped(tmp_path, make):
    r = make()
    page = r.to_html(tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    for axis in r.axes:
        for label in axis.labels:
            assert html.escape(plot.display_label(label), quote=True) in page
    assert "<script" not in page and not re.search(r"(src|href)=[\"']?https?:", page)
    assert "@import" not in page and "url(" not in page
    assert "<|endoftext|>" not in page  # only ever escaped
    assert r.method in page and r.model in page and "data-tip=" in page
    if r.target:
        assert html.escape(json.dumps(r.target, ensure_ascii=False), quote=True) in page


def test_html_fragment_and_report():
    r2, r1 = make_2d(), make_1d()
    fragment = r2._repr_html_()
    assert "<html" not in fragment and "<style>" in fragment and "lms-legend" in fragment
    page = plot.report_html([("Heat map", r2), ("Bars", plot.html_fragment(r1)), ("Table", r2.to_pandas().head())])
    assert page.count("<style>") == 1 and page.count("<h2>") == 3
    assert "<script" not in page and "L3.attn" in page
    with pytest.raises(InputError):
        plot.report_html([("bad", 3)])
