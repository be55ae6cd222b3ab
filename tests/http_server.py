"""A local static file server for tests, with the faults a real network has.

Serves a folder on 127.0.0.1 from a thread of the test process (so in-process
``eval.score`` and subprocess ``builders.verify`` both reach it) and can, per
path: drop the first N connections (``drop``), drip the body a byte at a time
(``drip``), or redirect elsewhere (``redirect``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    server: StaticServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        server = self.server
        path = self.path.split("?", 1)[0]
        server.requests[path] += 1
        if server.drops.get(path, 0) >= server.requests[path]:
            self.close_connection = True  # answer nothing: the client sees the connection reset
            return
        if path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path in server.drips:
            data = (Path(self.directory) / path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                if server.stopping.is_set():
                    return
                self.wfile.write(data[i : i + 1])
                self.wfile.flush()
                time.sleep(server.drips[path])
            return
        super().do_GET()


class StaticServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.requests: Counter[str] = Counter()
        self.drops: dict[str, int] = {}  # path -> connections to drop before answering
        self.drips: dict[str, float] = {}  # path -> seconds between bytes
        self.redirects: dict[str, str] = {}  # path -> Location
        self.stopping = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def static_server(root: Path) -> Iterator[StaticServer]:
    """Serve ``root`` until the block ends."""
    server = StaticServer(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
