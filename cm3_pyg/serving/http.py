"""A small HTTP server for top-K recommendations (standard library only).

``GET /recommend?user=ID&k=K`` answers ``{"user": ID, "items": [...], "scores": [...]}``
in the dataset's own ids; ``GET /health`` answers the run's summary. Errors are JSON
``{"error": message}``: 400 for a bad or missing parameter or a ``k`` outside
``[1, max_k]``, 404 for an unknown user or path, 405 for another method.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cm3_pyg.errors import RequestError
from cm3_pyg.serving.recommender import TopK, UnknownUserError

__all__ = ["RecommendationServer", "make_server"]

logger = logging.getLogger(__name__)


class RecommendationServer(ThreadingHTTPServer):
    """A threading HTTP server holding one :class:`TopK`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], top_k: TopK, default_k: int = 20) -> None:
        super().__init__(address, _Handler)
        self.top_k = top_k
        self.default_k = min(default_k, top_k.max_k)
        # Scoring shares the artifact's tensors; one request at a time keeps torch's
        # intra-op threads from oversubscribing the machine.
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: RecommendationServer
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the second waits for the
    # client's delayed ACK (about 40 ms per keep-alive request).
    disable_nagle_algorithm = True

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        url = urlsplit(self.path)
        top_k = self.server.top_k
        if url.path == "/health":
            art = top_k.artifact
            self._send(
                HTTPStatus.OK,
                {
                    "status": "ok",
                    "model": art.model,
                    "dataset": art.dataset,
                    "epoch": art.epoch,
                    "users": art.num_users,
                    "items": art.num_items,
                    "max_k": top_k.max_k,
                },
            )
            return
        if url.path != "/recommend":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {url.path!r}"})
            return
        query = parse_qs(url.query, keep_blank_values=True)
        users = query.get("user", [])
        if len(users) != 1 or not users[0]:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "give exactly one user=ID"})
            return
        raw_k = query.get("k", [str(self.server.default_k)])
        try:
            k = int(raw_k[-1])
        except ValueError:
            self._send(
                HTTPStatus.BAD_REQUEST, {"error": f"k must be an integer, got {raw_k[-1]!r}"}
            )
            return
        try:
            with self.server.lock:
                record = top_k.recommend([users[0]], k)[0]
        except UnknownUserError as exc:
            self._send(HTTPStatus.NOT_FOUND, {"error": str(exc)})
            return
        except RequestError as exc:
            self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        self._send(HTTPStatus.OK, record)

    def _not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET is served"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.info("%s %s", self.address_string(), format % args)


def make_server(
    top_k: TopK, host: str = "127.0.0.1", port: int = 8000, default_k: int = 20
) -> RecommendationServer:
    """A server bound to ``host:port`` (port 0: any free port); call ``serve_forever()``."""
    return RecommendationServer((host, port), top_k, default_k)
