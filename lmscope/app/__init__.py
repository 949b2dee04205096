"""The web app: a single-page explorer and a JSON API over the method specs (``lmscope app``)."""

from lmscope.app.server import App, make_server, served_specs, start

__all__ = ["App", "make_server", "served_specs", "start"]
