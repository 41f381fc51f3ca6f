"""`sdc serve` as a real subprocess on a free local port, for the tests that talk to it over HTTP.

    with running_server(build_dir, lora_dir) as srv:
        requests.get(srv.url + "/sdapi/v1/sd-models")

The server is started with `python -m sdc.cli.main serve --artifacts ... --port ...`, its stdout and
stderr go to a temporary log file (`srv.log()`), and it is always stopped on exit (SIGTERM, then
SIGKILL after 10 s). A server that exits early or is not healthy within `timeout` seconds fails
the test with the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

TAIL = 4000  # characters of the log shown in a failure


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self) -> str:
        return self.log()[-TAIL:]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(artifacts: Path, lora_dir: Path | None = None, *args: str, env=None,
                   timeout: float = 90):
    port = free_port()
    cmd = [sys.executable, "-m", "sdc.cli.main", "serve", "--artifacts", str(artifacts),
           "--port", str(port), *(["--lora-dir", str(lora_dir)] if lora_dir else []), *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="sdc-serve-") as tmp:
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        srv = Server(f"http://127.0.0.1:{port}", port, proc, log_path)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"sdc serve exited {proc.returncode} before it was healthy "
                                         f"({' '.join(cmd)}):\n{srv.tail()}")
                try:
                    if requests.get(srv.url + "/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"sdc serve not healthy within {timeout} s "
                                         f"({' '.join(cmd)}):\n{srv.tail()}")
                time.sleep(0.2)
            yield srv
        finally:
            _stop(proc)
