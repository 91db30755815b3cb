"""A real HTTP file server on 127.0.0.1 for download tests: Range requests, dropped connections,
404s and stalls. Written by hand because http.server's SimpleHTTPRequestHandler has no Range support.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves `files` (URL path -> bytes). Knobs, set by the test:

    drop_after[path] = n   the next response for path sends n body bytes, then closes (once)
    stall = s              every response waits s seconds before its headers
    chunk_delay = s        pause between 4 KiB body chunks (keeps concurrent downloads overlapping)
    redirects[path] = url  answer path with a 302 to url
    hide_length            send no Content-Length (the body ends when the connection closes)
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.stall = 0.0
        self.chunk_delay = 0.0
        self.redirects: dict[str, str] = {}
        self.hide_length = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def gets(self, path: str) -> list[dict[str, str]]:
        """Headers of each request made for `path`."""
        return [headers for p, headers in self.requests if p == path]

    def __enter__(self) -> FileServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._release.set()  # end any stall so its thread finishes
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                owner.requests.append((self.path, dict(self.headers)))
                if owner.stall:
                    owner._release.wait(owner.stall)
                if self.path in owner.redirects:
                    self.send_response(302)
                    self.send_header("Location", owner.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if owner.hide_length:
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                drop = owner.drop_after.pop(self.path, None)
                if drop is not None:
                    body = body[:drop]
                    self.close_connection = True
                try:
                    for i in range(0, len(body), 4096):
                        self.wfile.write(body[i : i + 4096])
                        if owner.chunk_delay:
                            time.sleep(owner.chunk_delay)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client stopped reading (a refused or killed download)

        return Handler
