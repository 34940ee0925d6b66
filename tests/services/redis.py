"""A real Redis server for the tests and benchmarks: Debian's ``redis-server`` on a free loopback
port with its files in a temp dir (``make test-deps`` installs it).

``redis_url`` is the session fixture; ``start_redis`` is the same server for scripts.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from tests.services import free_port, unavailable

START_TIMEOUT = 20.0


class RedisServer:
    """One ``redis-server`` process; ``stop`` ends it."""

    def __init__(self, root: Path, settings: Sequence[str] = (), port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(root),
            "--logfile", str(root / "redis.log"),
            "--daemonize", "no",
            "--save", "",
            *settings,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with status {self._process.returncode}; "
                        f"see {self.root / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer on port {self.port} in {START_TIMEOUT} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


def redis_missing() -> str | None:
    """Why no test Redis can start here, or None if it can."""
    if shutil.which("redis-server") is None:
        return "no `redis-server` on PATH; run `make test-deps`"
    return None


def start_redis(
    tmpdir: Path | str, settings: Sequence[str] = (), port: int | None = None
) -> RedisServer:
    """Start a server with its files in ``tmpdir`` (on ``port``, else a free one); the caller
    stops it."""
    reason = redis_missing()
    if reason is not None:
        raise RuntimeError(reason)
    return RedisServer(Path(tmpdir), settings, port)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = redis_missing()
    if reason is not None:
        unavailable("Redis", reason)
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()
