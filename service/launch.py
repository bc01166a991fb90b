"""Start `lookalike serve` as a real process on a free loopback port and wait until it is ready.

Used by the end-to-end tests and the service benchmark, which both need the real server, not an
in-process app.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

LOOKALIKE = Path(sys.executable).with_name("lookalike")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(config: Path, *, timeout: float = 300, port: int | None = None) -> Iterator[str]:
    """Yield the base URL of a server whose GET /readyz answers 200; stop it afterwards."""
    port = port or free_port()
    log_path = config.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(LOOKALIKE), "serve", "--config", str(config), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready after {timeout} s:\n{log_path.read_text()}")
                time.sleep(0.3)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
