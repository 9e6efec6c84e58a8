"""Start and stop a real `vllm serve` on localhost (tests, the soak benchmark)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir: str, port: int, *args: str, additional: dict | None = None):
    command = [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        str(model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        *args,
    ]
    if additional is not None:
        command += ["--additional-config", json.dumps(additional)]
    return command


@dataclass
class Server:
    process: subprocess.Popen
    base: str  # http://127.0.0.1:PORT
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(
    model_dir: str,
    *args: str,
    log_path: str,
    additional: dict | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Launch `vllm serve` (not yet healthy); output goes to `log_path`. It runs outside the
    repository so that the repository's top-level folders cannot shadow installed packages.
    `env` adds to (or overrides) this process's environment for the server."""
    port = free_port()
    log = open(log_path, "w")  # noqa: SIM115 - the child owns it until it exits
    process = subprocess.Popen(
        serve_command(model_dir, port, *args, additional=additional),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd="/",
        env=None if env is None else {**os.environ, **env},
    )
    log.close()
    return Server(process, f"http://127.0.0.1:{port}", log_path)


def metric_samples(base: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample on the server's `/metrics`: (name, labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def wait_healthy(server: Server, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("vllm serve exited:\n" + server.log()[-5000:])
        try:
            with urllib.request.urlopen(server.base + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("vllm serve did not become healthy:\n" + server.log()[-5000:])


def wait_exit(server: Server, timeout: float = 300) -> int:
    """For a server expected to fail at startup: its exit status (raises if it still runs)."""
    try:
        return server.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.stop()
        raise TimeoutError("vllm serve did not exit:\n" + server.log()[-5000:]) from None
