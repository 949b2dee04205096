"""A Result in a notebook, drawn by the app's own renderers (``static/views.js``: one bundle for both).

``show(result)`` returns an IPython ``HTML`` object (a Jupyter cell displays it); ``result_html(result)`` the
self-contained HTML fragment behind it: the Result's JSON and the renderer inlined, no network. A view seen in
the app can be reproduced from its exported JSON: ``show(Result.from_dict(json.load(open("patch.json"))))`` or
``show(json.load(...))``.
"""

from __future__ import annotations

import json
import uuid
from importlib import resources
from typing import Any

from lmscope.errors import InputError


def _doc(result: Any) -> dict:
    if isinstance(result, dict):
        return result
    to_dict = getattr(result, "to_dict", None)
    if to_dict is None:
        raise InputError(f"show() draws a Result (or its JSON dict), not a {type(result).__name__}.")
    return to_dict()


def result_html(result: Any) -> str:
    """A self-contained HTML fragment drawing ``result`` (a Result or its JSON dict) with the app's renderer."""
    doc = json.dumps(_doc(result), allow_nan=False).replace("</", "<\\/")
    views = (resources.files("lmscope.app") / "static" / "views.js").read_text(encoding="utf-8")
    box = f"lmscope-{uuid.uuid4().hex[:12]}"
    return (f'<div id="{box}" class="lmscope-result"></div>\n<script>\n{views}\n'
            f'document.getElementById("{box}").appendChild(window.LmViews.result({doc}));\n</script>\n')


def show(result: Any):
    """Display ``result`` in a notebook cell (an ``IPython.display.HTML``)."""
    try:
        from IPython.display import HTML
    except ImportError:
        raise InputError("show() needs IPython (a Jupyter kernel); result_html(result) gives the HTML.") from None
    return HTML(result_html(result))
