"""The app's web server: Starlette routes on uvicorn over an :class:`~lmscope.app.server.App`.

Model work never runs on the event loop: a request's checks run in Starlette's thread pool, and its
computation on the model's one worker thread (``App.executor``: calls are serialised per model, in the order
they came), so the server keeps answering (``/api/info``, ``/api/jobs/<id>``, cached results) while a long job
runs. Every error is JSON ``{"error", "status"}``: a 4xx with the library's message for bad input, 413 past
the limits, 503 when the queue is full.

``Server(app, host, port)`` binds its socket at once (port 0: any free port, ``server_address`` says which);
``serve_forever()`` serves in this thread, :func:`start` in a background one; ``shutdown()`` stops it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmscope.app.server import App, HTTPError, _static
from lmscope.errors import InputError, LmscopeError

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
BAD_INPUT = (LmscopeError, InputError, TypeError, ValueError, KeyError, IndexError)


def _json(status: int, doc: dict) -> Response:
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()
    return Response(body, status, media_type="application/json", headers={"Cache-Control": "no-store"})


def _error(err: BaseException) -> Response:
    if isinstance(err, HTTPError):
        status, text = err.status, str(err)
    elif isinstance(err, BAD_INPUT):
        status, text = 400, str(err) or type(err).__name__
    else:  # a bug: say so, keep serving
        status, text = 500, f"{type(err).__name__}: {err}"
    return _json(status, {"error": text, "status": status})


def guarded(handler):
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as err:  # noqa: BLE001 - every error becomes a JSON answer
            return _error(err)
    return endpoint


async def _body(request: Request, most: int) -> Any:
    """The request's JSON body, refused past ``most`` bytes (413) without reading more than that."""
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise HTTPError(400, "Bad Content-Length.") from None
    if length < 0 or length > most:
        raise HTTPError(413, f"The request body is over {most} bytes.")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > most:
            raise HTTPError(413, f"The request body is over {most} bytes.")
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPError(400, f"The body is not JSON ({err}).") from None


def make_asgi(app: App) -> Starlette:
    """The Starlette application serving ``app``: the page, ``/api/info``, ``/api/run``, ``/api/jobs/<id>``."""

    async def page(request: Request) -> Response:
        body, ctype = _static(request.path_params.get("name", ""))
        return Response(body, 200, media_type=ctype, headers={"Cache-Control": "no-store"})

    async def info(request: Request) -> Response:
        return _json(200, app.info())

    async def run(request: Request) -> Response:
        body = await _body(request, app.max_body)
        job_id = request.headers.get("x-job-id")
        if job_id is not None and not JOB_ID.fullmatch(job_id):
            raise HTTPError(400, "X-Job-Id: at most 64 letters, digits, '-' or '_'.")
        job = await run_in_threadpool(app.submit, body, job_id)  # checks (the tokenizer) off the loop
        if job.hit is not None:
            return _json(200, app.work(job))
        doc = await asyncio.get_running_loop().run_in_executor(app.executor, app.work, job)
        return _json(200, doc)

    async def job(request: Request) -> Response:
        return _json(200, app.job_status(request.path_params["id"]))

    async def favicon(request: Request) -> Response:
        return Response(b"", 204, media_type="image/x-icon")

    async def not_found(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _json(405, {"error": "POST /api/run is the only API call that takes a body.", "status": 405})
        path = request.url.path
        text = "POST /api/run is the only API call." if path.startswith("/api/") else f"No page {path!r}; the app is at /."
        return _json(exc.status_code, {"error": text, "status": exc.status_code})

    routes = [Route("/", guarded(page)), Route("/static/{name}", guarded(page)), Route("/favicon.ico", favicon),
              Route("/api/info", guarded(info)), Route("/api/run", guarded(run), methods=["POST"]),
              Route("/api/jobs/{id}", guarded(job))]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


class Server:
    """uvicorn serving ``make_asgi(app)`` on a socket bound at construction; ``requests`` > 0 stops it after
    that many requests."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 8000, requests: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as err:
            self.socket.close()
            raise InputError(f"Cannot serve on {host}:{port} ({err.strerror}); choose another --port (0: any "
                             "free port).") from None
        self.socket.listen(128)  # the backlog: bursts of connections queue instead of being reset
        self.server_address = self.socket.getsockname()[:2]
        self.app = app
        config = uvicorn.Config(make_asgi(app), http="h11", loop="asyncio", lifespan="off", log_level="warning",
                                access_log=False, limit_max_requests=requests or None, timeout_graceful_shutdown=5)
        self.uvicorn = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self, timeout: float = 10) -> None:
        """Stop serving (from another thread) and wait for the server to finish."""
        self.uvicorn.should_exit = True
        self._done.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000, requests: int = 0) -> Server:
    """A server for ``app`` (port 0: any free port; ``server.server_address`` says which)."""
    return Server(app, host, port, requests)


def start(app: App, host: str = "127.0.0.1", port: int = 0) -> tuple[Server, threading.Thread]:
    """Serve ``app`` in a background thread; stop with ``server.shutdown(); server.server_close()``."""
    server = make_server(app, host, port)
    thread = threading.Thread(target=server.serve_forever, name="lmscope-app", daemon=True)
    thread.start()
    while not (server.uvicorn.started or server._done.is_set()):
        server._done.wait(0.01)
    return server, thread
