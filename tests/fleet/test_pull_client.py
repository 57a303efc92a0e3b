"""The fleet clients' own measurements (pull.py), against a plain local server."""

from __future__ import annotations

import hashlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from .pull import fetch

BODY = bytes(range(256)) * 4096  # 1 MiB


class SlowBody(http.server.BaseHTTPRequestHandler):
    """Sends the body in four parts, 50 ms apart: a stream that arrives over time."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        part = len(BODY) // 4
        for start in range(0, len(BODY), part):
            time.sleep(0.05)
            self.wfile.write(BODY[start:start + part])
            self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowBody)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/blob"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_client_times_each_quarter_of_the_stream(server: str):
    result = fetch(server, timeout=10)
    assert result["bytes"] == len(BODY) and not result.get("error")
    assert result["sha256"] == "sha256:" + hashlib.sha256(BODY).hexdigest()
    quarters = result["quarters_s"]
    assert len(quarters) == 3
    assert result["first_byte_s"] <= quarters[0] < quarters[1] < quarters[2] <= result["done_s"]
    assert quarters[2] - quarters[0] >= 0.08  # the parts came 50 ms apart, and were timed so
