"""Pictures of results: PNG heat maps and bar charts, and self-contained interactive HTML.

Everything here is a function over `lmscope.results.Result`; none of it analyses anything.

    heatmap_png(r, "dla.png")        # 2-D: heat map (axis 0 on rows); 1-D: horizontal bars
    save_html(r, "dla.html")         # one page, no scripts or CDN: hover a cell for its labels and value
    html_fragment(r)                 # the same without <html>, for Jupyter or for report_html
    report_html([("Logit lens", r1), ("Top tokens", df.to_html())])

Colours: values with both signs use RdBu_r centred at 0 (red positive, blue negative); values of
one sign use Reds (or Blues_r when all are negative) over their range. Token labels are shown with
their invisible parts made visible (`display_label`): a leading space as '␣', a newline as '\\n'.
"""

from __future__ import annotations

import functools
import html
import io
import json
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib import colormaps, colors, font_manager, ft2font
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmscope.errors import InputError
from lmscope.results import atomic_write_bytes

if TYPE_CHECKING:
    from lmscope.results import Result

POSITIVE, NEGATIVE = "#d6604d", "#4393c3"  # bar colours, from RdBu
MAX_HTML_CELLS = 20_000
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def display_label(label: str) -> str:
    """A label with its invisible parts made visible: leading/trailing spaces as '␣', newlines,
    tabs and other control characters as escapes ('\\n', '\\t', '\\x00'), the empty label as '""'."""
    text = "".join(
        _ESCAPES.get(c, f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in label
    )
    core = text.strip(" ")
    if not core:
        return "␣" * len(text) if text else '""'
    lead = len(text) - len(text.lstrip(" "))
    trail = len(text) - len(text.rstrip(" "))
    return "␣" * lead + core + "␣" * trail


def color_scale(values: np.ndarray, cmap: str | None = None) -> tuple[str, float, float]:
    """(colormap name, vmin, vmax) for `values`: centred at 0 when they have both signs."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo < 0 < hi:
        return cmap or "RdBu_r", -max(-lo, hi), max(-lo, hi)
    if lo == hi:  # constant values: widen the range so they sit mid-scale
        pad = abs(lo) or 1.0
        return cmap or ("RdBu_r" if lo == 0 else "Reds" if lo > 0 else "Blues_r"), lo - pad, hi + pad
    return cmap or ("Reds" if lo >= 0 else "Blues_r"), lo, hi


def _float_values(result: Result) -> np.ndarray:
    return result.values.double().numpy()


def _default_title(result: Result) -> str:
    title = f"{result.method} · {result.model}"
    target = result.target or {}
    if "target" in target:
        title += f" · target {display_label(str(target['target']))}"
        if target.get("foil") is not None:
            title += f" vs {display_label(str(target['foil']))}"
    for name, chosen in result.meta.get("selected", {}).items():
        title += f" · {name} {display_label(str(chosen['label']))}"
    return title


# ---------------------------------------------------------------------------------------- PNG
@functools.lru_cache(maxsize=8)
def _font_chars(font_path: str) -> frozenset[int]:
    return frozenset(ft2font.FT2Font(font_path).get_charmap())


def _glyph_safe(text: str) -> str:
    """`text` with the characters the default font lacks replaced by '□', so matplotlib neither
    warns about missing glyphs (tests run with warnings as errors) nor draws empty boxes."""
    chars = _font_chars(font_manager.findfont(font_manager.FontProperties()))
    missing = "□" if ord("□") in chars else "?"
    return "".join(c if ord(c) in chars or c == "\n" else missing for c in text)


def _mpl_text(label: str, limit: int = 28) -> str:
    """A tick label: `display_label(label)`, drawable, at most `limit` characters."""
    shown = _glyph_safe(display_label(label))
    return shown if len(shown) <= limit else _glyph_safe(shown[: limit - 1] + "…")


def _ticks(labels: tuple[str, ...], most: int = 80) -> tuple[list[int], list[str]]:
    """Tick positions and shown labels: every label, or every n-th when there are too many."""
    step = max(1, -(-len(labels) // most))
    positions = list(range(0, len(labels), step))
    return positions, [_mpl_text(labels[i]) for i in positions]


def heatmap_png(
    result: Result,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    cmap: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw a 2-D result as a heat map (axis 0 on rows, axis 1 on columns, colour bar) or a 1-D
    result as horizontal bars, and write it to `path` as PNG. `cmap=None` picks RdBu_r centred at
    0 for signed values, Reds/Blues_r otherwise; a given cmap is still centred for signed values."""
    if result.values.ndim not in (1, 2):
        raise _wrong_dims("heatmap_png draws 1-D or 2-D results", result)
    if result.values.numel() == 0:
        raise InputError(f"cannot draw an empty result (shape {result.shape})")
    title = _glyph_safe(title or _default_title(result))
    fig = _heatmap_figure(result, title, cmap) if result.values.ndim == 2 else _bar_figure(result, title)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _wrong_dims(what: str, result: Result) -> InputError:
    if not result.axes:
        return InputError(f"{what}; this one is a single value ({result.values.item()})")
    return InputError(
        f"{what}; this one has {len(result.axes)} axes ({', '.join(result.axis_names)}): pick single "
        f"indices with Result.sel, e.g. result.sel({result.axis_names[0]}=0)"
    )


def _wrap(title: str, width_in: float) -> str:
    return "\n".join(textwrap.fill(line, int(width_in * 8)) for line in title.splitlines())


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _heatmap_figure(result: Result, title: str, cmap: str | None) -> Figure:
    values = _float_values(result)
    rows, cols = result.axes
    row_pos, row_text = _ticks(rows.labels)
    col_pos, col_text = _ticks(cols.labels)
    char = 0.07  # inches per character at 7-8 pt
    width = _clamp(2.2 + char * max(map(len, row_text)) + 0.32 * len(col_pos), 4.5, 30)
    height = _clamp(1.4 + char * max(map(len, col_text)) + 0.26 * len(row_pos), 3.5, 30)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    name, vmin, vmax = color_scale(values, cmap)
    image = ax.imshow(
        values,
        cmap=colormaps[name].with_extremes(bad="#dddddd"),
        vmin=vmin,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_yticks(row_pos, row_text, fontsize=8, parse_math=False)
    ax.set_xticks(col_pos, col_text, fontsize=8, rotation=90, parse_math=False)
    ax.set_ylabel(rows.name)
    ax.set_xlabel(cols.name)
    fig.suptitle(_wrap(title, width), fontsize=10, parse_math=False)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, shrink=min(1.0, 6 / height + 0.3))
    return fig


def _bar_figure(result: Result, title: str) -> Figure:
    values = _float_values(result)
    (axis,) = result.axes
    pos, text = _ticks(axis.labels, most=120)
    width = _clamp(5.5 + 0.07 * max(map(len, text)), 5.5, 12)
    height = _clamp(1.3 + 0.22 * len(values) / max(1, -(-len(values) // 120)), 2.5, 30)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    shown = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    ax.barh(np.arange(len(values)), shown, color=[POSITIVE if v >= 0 else NEGATIVE for v in shown])
    ax.axvline(0, color="#444444", linewidth=0.8)
    ax.set_yticks(pos, text, fontsize=8, parse_math=False)
    ax.set_ylim(len(values) - 0.5, -0.5)  # first label on top
    ax.set_ylabel(axis.name)
    ax.set_xlabel("value")
    fig.suptitle(_wrap(title, width), fontsize=10, parse_math=False)
    return fig


# --------------------------------------------------------------------------------------- HTML
_CSS = """
.lms{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:13px;color:#222;margin:8px 0}
.lms h3{margin:4px 0 6px;font-size:15px}
.lms-meta{display:grid;grid-template-columns:max-content auto;gap:1px 12px;margin:0 0 8px;font-size:12px}
.lms-meta dt{font-weight:600;color:#555}
.lms-meta dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all}
.lms-scroll{overflow:auto;max-height:80vh;max-width:100%;border:1px solid #ddd;padding-bottom:60px}
.lms table{border-collapse:collapse;font-size:11px}
.lms th{font-weight:normal;font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre;
 background:#f7f7f7;padding:1px 4px}
.lms thead th{position:sticky;top:0;z-index:3;vertical-align:bottom}
.lms th.lms-row{position:sticky;left:0;z-index:2;text-align:right}
.lms thead th.lms-corner{left:0;z-index:4;color:#666;font-family:inherit}
.lms-vert{writing-mode:vertical-rl;transform:rotate(180deg)}
.lms td.lms-cell{position:relative;min-width:2.6em;height:1.6em;padding:0 3px;text-align:center;font-size:10px}
.lms [data-tip]{position:relative}
.lms [data-tip]:hover{outline:2px solid #000;outline-offset:-2px;z-index:5}
.lms [data-tip]:hover::after{content:attr(data-tip);position:absolute;left:50%;top:100%;z-index:10;
 white-space:pre;background:#222;color:#fff;padding:4px 7px;border-radius:4px;
 font:12px/1.4 ui-monospace,Menlo,monospace;text-align:left;pointer-events:none}
.lms-legend{display:flex;align-items:center;gap:6px;margin:6px 0;font-size:11px}
.lms-grad{width:240px;height:12px;border:1px solid #aaa}
.lms td.lms-barcell{width:320px;min-width:320px;height:16px;padding:0}
.lms-bar{position:absolute;top:2px;bottom:2px}
.lms-zero{position:absolute;top:0;bottom:0;border-left:1px solid #888}
.lms td.lms-val{font-family:ui-monospace,Menlo,monospace;padding:0 6px;text-align:right}
.lms-note{color:#a33}
.lms-df table,.lms table.lms-df{border-collapse:collapse;font-size:12px}
.lms-df th,.lms-df td{border:1px solid #ddd;padding:2px 6px;white-space:pre}
.lms-page{max-width:1400px;margin:0 auto;padding:8px 16px}
.lms-page h1{font-family:system-ui,sans-serif;font-size:20px}
.lms-page h2{font-family:system-ui,sans-serif;font-size:17px;margin:24px 0 4px;border-bottom:1px solid #ddd}
"""
_STYLE = f"<style>{_CSS}</style>"


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float, integer: bool) -> str:
    if integer:
        return str(int(value))
    return "nan" if np.isnan(value) else f"{value:.4g}"


def _header_html(result: Result, title: str | None) -> str:
    items = [("method", result.method), ("model", result.model)]
    if result.target is not None:
        items.append(("target", json.dumps(result.target, ensure_ascii=False)))
    if result.params:
        items.append(("params", json.dumps(result.params, ensure_ascii=False)))
    if "selected" in result.meta:
        items.append(("selected", json.dumps(result.meta["selected"], ensure_ascii=False)))
    items.append(("axes", " × ".join(f"{a.name} ({len(a)})" for a in result.axes) or "none (one value)"))
    items.append(("created", f"{result.created} · lmscope {result.lmscope_version}"))
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    return f"<h3>{_esc(title or _default_title(result))}</h3><dl class=\"lms-meta\">{rows}</dl>"


def _legend_html(name: str, vmin: float, vmax: float) -> str:
    cmap = colormaps[name]
    stops = ", ".join(colors.to_hex(cmap(x)) for x in np.linspace(0, 1, 11))
    return (
        f'<div class="lms-legend"><span>{vmin:.4g}</span>'
        f'<span class="lms-grad" style="background:linear-gradient(to right, {stops})"></span>'
        f"<span>{vmax:.4g}</span><span>({_esc(name)}, centre {(vmin + vmax) / 2:.4g})</span></div>"
    )


def _heatmap_html(result: Result) -> str:
    values = _float_values(result)
    integer = not result.values.is_floating_point()
    rows, cols = result.axes
    name, vmin, vmax = color_scale(values)
    cmap = colormaps[name]
    rgba = cmap(np.clip((values - vmin) / (vmax - vmin), 0, 1))
    show_numbers = len(cols) <= 24
    vertical = any(len(display_label(label)) > 3 for label in cols.labels)
    head = [f'<th class="lms-corner">{_esc(rows.name)} ↓ &nbsp; {_esc(cols.name)} →</th>']
    for label in cols.labels:
        text = _esc(display_label(label))
        head.append(f'<th><span class="lms-vert">{text}</span></th>' if vertical else f"<th>{text}</th>")
    body = []
    for i, row_label in enumerate(rows.labels):
        cells = [f'<th class="lms-row">{_esc(display_label(row_label))}</th>']
        for j, col_label in enumerate(cols.labels):
            value = values[i, j]
            shown = _fmt(value, integer)
            tip = (f"{rows.name} {i}: {display_label(row_label)}\n"
                   f"{cols.name} {j}: {display_label(col_label)}\nvalue: {shown}")
            if np.isfinite(value):
                r, g, b, _ = rgba[i, j]
                bg = colors.to_hex((r, g, b))
                fg = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#000"
            else:
                bg, fg = "#dddddd", "#000"
            cells.append(
                f'<td class="lms-cell" style="background:{bg};color:{fg}" data-tip="{_esc(tip)}">'
                f"{shown if show_numbers else ''}</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<table><thead><tr>{"".join(head)}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return _legend_html(name, vmin, vmax) + f'<div class="lms-scroll">{table}</div>'


def _bars_html(result: Result) -> str:
    values = _float_values(result)
    integer = not result.values.is_floating_point()
    (axis,) = result.axes
    finite = values[np.isfinite(values)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = max(0.0, float(finite.max())) if finite.size else 1.0
    span = (hi - lo) or 1.0
    zero = -lo / span * 100
    body = []
    for i, (label, value) in enumerate(zip(axis.labels, values)):
        shown = _fmt(value, integer)
        bar = ""
        if np.isfinite(value):
            left = (min(value, 0.0) - lo) / span * 100
            colour = POSITIVE if value >= 0 else NEGATIVE
            size = f"left:{left:.3f}%;width:{abs(value) / span * 100:.3f}%"
            bar = f'<div class="lms-bar" style="{size};background:{colour}"></div>'
        tip = f"{axis.name} {i}: {display_label(label)}\nvalue: {shown}"
        body.append(
            f'<tr><th class="lms-row">{_esc(display_label(label))}</th>'
            f'<td class="lms-barcell" data-tip="{_esc(tip)}">'
            f'<div class="lms-zero" style="left:{zero:.3f}%"></div>{bar}</td>'
            f'<td class="lms-val">{shown}</td></tr>'
        )
    head = f'<thead><tr><th class="lms-corner">{_esc(axis.name)}</th><th></th><th>value</th></tr></thead>'
    return f'<div class="lms-scroll"><table>{head}<tbody>{"".join(body)}</tbody></table></div>'


def html_fragment(result: Result, title: str | None = None, *, style: bool = True) -> str:
    """The interactive view of a 0-, 1- or 2-D result as an HTML fragment (no <html> wrapper):
    a header (method, model, target, params), then a heat-map table with a colour legend (2-D) or
    bars (1-D); hover a cell for its labels and value. Pure HTML and CSS: no scripts at all.
    `style=False` leaves out the <style> block (for pages that include `_CSS` once)."""
    ndim = result.values.ndim
    if ndim > 2:
        raise _wrong_dims("HTML views show results of up to 2 axes", result)
    if result.values.numel() > MAX_HTML_CELLS:
        raise InputError(
            f"result has {result.values.numel()} cells, more than an HTML table shows well "
            f"({MAX_HTML_CELLS}); select a slice with Result.sel, or use heatmap_png"
        )
    if ndim == 2:
        view = _heatmap_html(result)
    elif ndim == 1:
        view = _bars_html(result)
    else:
        view = f"<p>value: {_esc(_fmt(result.values.item(), not result.values.is_floating_point()))}</p>"
    return f'{_STYLE if style else ""}<div class="lms">{_header_html(result, title)}{view}</div>'


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title>{_STYLE}</head>\n"
        f'<body><div class="lms-page">{body}</div></body></html>\n'
    )


def to_html(result: Result, title: str | None = None) -> str:
    """A complete, self-contained HTML document showing `result` (see `html_fragment`)."""
    return _page(title or _default_title(result), html_fragment(result, title, style=False))


def save_html(result: Result, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write `to_html(result, title)` to `path` (UTF-8, atomically)."""
    return atomic_write_bytes(path, to_html(result, title).encode("utf-8"))


def report_html(sections: list[tuple[str, object]], title: str = "lmscope report") -> str:
    """One self-contained page from titled sections. Each body is a `Result` (drawn with
    `html_fragment`), a pandas DataFrame (drawn as a table), or a string of HTML inserted as is
    (so pass only HTML you made, e.g. `html_fragment(r)` or `df.to_html()`)."""
    import pandas as pd

    from lmscope.results import Result

    parts = [f'<div class="lms"><h1>{_esc(title)}</h1></div>']
    for heading, body in sections:
        if isinstance(body, Result):
            body = html_fragment(body, style=False)
        elif isinstance(body, pd.DataFrame):
            body = f'<div class="lms lms-df">{body.to_html(border=0)}</div>'
        elif not isinstance(body, str):
            raise InputError(f"report section {heading!r}: body must be a Result, DataFrame or str")
        heading_html = f'<div class="lms"><h2>{_esc(heading)}</h2></div>'
        parts.append(f'<section>{heading_html}{body.replace(_STYLE, "")}</section>')
    return _page(title, "\n".join(parts))
