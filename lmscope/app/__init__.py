"""The web app: a single-page explorer and a JSON API over the method specs (``lmscope app``), and the same
renderers for a Result in a notebook."""

from lmscope.app.notebook import result_html, show
from lmscope.app.server import App, served_specs
from lmscope.app.web import Server, make_asgi, make_server, start

__all__ = ["App", "Server", "make_asgi", "make_server", "result_html", "served_specs", "show", "start"]
