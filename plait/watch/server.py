"""The live page's HTTP server: the page's files, and ``/api/state`` (JSON) that it polls.

Read-only: it answers GET and HEAD, and only for the paths below (the page, its script and
style, an empty favicon, the state), so no request names a file on disk. It listens on 127.0.0.1 unless told another address; while on loopback it answers only
requests addressed to a loopback name (a page elsewhere cannot reach it by DNS rebinding).
Every asset ships inside plait (no CDN), so the page works on a machine without internet.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from plait.errors import UsageError
from plait.watch.reader import RunReader

LOOPBACK = "127.0.0.1"
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/style.css": ("style.css", "text/css; charset=utf-8")}
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"}


class BindError(OSError):
    """The page cannot listen where it was asked to; the message says why, in one line."""


def _asset(name: str) -> bytes:
    return resources.files("plait.watch").joinpath("assets", name).read_bytes()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Handler(BaseHTTPRequestHandler):
    server: "PageServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name): no access log
        pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _addressed_here(self) -> bool:
        if not self.server.loopback_only:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return is_loopback(name.strip("[]"))

    def do_GET(self, head: bool = False) -> None:  # noqa: N802 (http.server's naming)
        if not self._addressed_here():
            self._send(HTTPStatus.FORBIDDEN, b"this page answers only to a loopback address\n", "text/plain", head)
            return
        url = urlsplit(self.path)
        if url.path in ASSETS:
            name, content_type = ASSETS[url.path]
            self._send(HTTPStatus.OK, self.server.assets[name], content_type, head)
        elif url.path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", head)
        elif url.path == "/api/state":
            query = parse_qs(url.query)
            have = [_count(query.get(key)) for key in ("rows", "events")]
            generation = _count(query.get("gen")) if query.get("gen") else None
            body = _dumps(self.server.reader.state(*have, generation))
            self._send(HTTPStatus.OK, body, "application/json", head)
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET(head=True)


def _count(values: list[str] | None) -> int:
    try:
        return max(0, int(values[0])) if values else 0
    except ValueError:
        return 0


def _dumps(state: dict) -> bytes:
    """JSON for the browser: NaN and infinities (a diverged loss) become null."""
    text = json.dumps(state, separators=(",", ":"), default=str)
    if "NaN" in text or "Infinity" in text:
        text = json.dumps(_finite(state), separators=(",", ":"), default=str)
    return text.encode()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class PageServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, run_dir: str, host: str = LOOPBACK, port: int = 0):
        self.reader = RunReader(run_dir)
        self.assets = {name: _asset(name) for name, _ in ASSETS.values()}
        self.loopback_only = is_loopback(host)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise BindError(f"cannot listen on {host}:{port} ({why})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"

    def handle_error(self, request, client_address) -> None:
        """A browser that goes away mid-answer is no error; anything else is one line, never a
        traceback in the training's log."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            print(f"plait: live page: request from {client_address[0]} failed ({error!r:.200})", file=sys.stderr, flush=True)

    def start(self) -> "PageServer":
        """Serve from a daemon thread; returns self."""
        threading.Thread(target=self.serve_forever, name="plait-page", daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def open_page(run_dir: str, host: str, port: int, setting: str) -> PageServer:
    """Bind the page for ``run_dir`` (serving starts with ``start``); a port that cannot be
    used is a UsageError naming ``setting``, the option the user wrote."""
    try:
        server = PageServer(run_dir, host, port)
    except BindError as exc:
        raise UsageError(f"{setting}: {exc}; choose another port (1-65535) or address") from None
    if not server.loopback_only:
        print(f"plait: warning: the live page listens on {host}, reachable from the network; it shows the "
              "run's metrics to anyone who can connect", file=sys.stderr, flush=True)
    return server
