"""Free loopback ports and waiting for a listener: every server here binds 127.0.0.1 only."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from typing import Callable

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port the kernel just handed out; tiny race with other binders, fine for tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, ok: tuple[int, ...] = (200,),
              alive: Callable[[], bool] | None = None) -> int:
    """Poll `url` until it answers with a status in `ok`; returns that status.

    `alive` lets the caller abort early when the process behind the URL died,
    so a crash surfaces at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"process serving {url} exited (last poll: {last!r})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok:
                    return resp.status
                last = resp.status
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return e.code
            last = e.code
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last poll: {last!r})")
