"""A real PostgreSQL server for the tests and benchmarks: Debian's ``initdb`` and ``pg_ctl`` (``make
test-deps`` installs them), a cluster in a temp dir on a free loopback port, trust auth, one
database.

``postgres_url`` is the session fixture; ``start_postgres`` is the same server for scripts.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest

from tests.services import free_port, unavailable, wait_stopped

USER = "riverbed"
DATABASE = "riverbed"
START_TIMEOUT = 30
# Settings for a throwaway cluster: no fsync (the tests never survive a power cut, and a commit
# costs a round trip instead of a disk flush), small memory, and enough connections for the
# suites' writer processes and pools.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "max_wal_size": "1GB",
    "log_min_messages": "warning",
}
# initdb and the server refuse to run as root; the tests then run them as one of these users.
SERVER_USERS = ("postgres", "nobody")


def _binaries() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned one."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(found[0]).parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs initdb and the server when this process is root: the first of SERVER_USERS
    that exists."""
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def postgres_missing() -> str | None:
    """Why no test PostgreSQL can start here, or None if it can."""
    if _binaries() is None:
        return "no `initdb`/`pg_ctl` on PATH or under /usr/lib/postgresql; run `make test-deps`"
    if os.geteuid() == 0 and _server_user() is None:
        return (
            f"running as root, and none of the users {', '.join(SERVER_USERS)} exists to run "
            "PostgreSQL (it refuses root); create one or run the tests as another user"
        )
    return None


class PostgresServer:
    """One cluster, initialised in its own directory and started by ``pg_ctl``; ``stop`` ends it
    and deletes the cluster."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        bindir = _binaries()
        assert bindir is not None
        self._bindir = bindir
        self._user = _server_user() if os.geteuid() == 0 else None
        self.root = root
        self.log_path = root / "postgres.log"
        # Root's temp dirs (pytest's are 0700) cannot be entered by the server's user, so its
        # cluster then lives in a directory of its own, which ``stop`` deletes.
        self.home = Path(tempfile.mkdtemp(prefix="riverbed-pg-")) if self._user else root
        self.data = self.home / "data"
        self.port = port or free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"
        self._started = False
        try:
            if self._user is not None:
                os.chown(self.home, self._user.pw_uid, self._user.pw_gid)
            self._run(
                "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8",
                "--locale=C", "--no-sync", "--no-instructions",
            )  # fmt: skip
            with (self.data / "postgresql.conf").open("a") as conf:
                settings = {
                    **SETTINGS,
                    "port": str(self.port),
                    "unix_socket_directories": f"'{self.home}'",
                }
                conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))
            self._started = True  # from here on, ``stop`` stops whatever pg_ctl got running
            # The server inherits pg_ctl's output: a file this process opened, so the log can
            # live in ``root`` even where the server's user could not open it.
            with self.log_path.open("ab") as log:
                self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data),
                          stdout=log)  # fmt: skip
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {DATABASE}")
        except BaseException:
            self.stop()
            raise

    @property
    def admin_url(self) -> str:
        """The cluster's ``postgres`` database, for creating and dropping others."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(
        self, program: str, *args: str, stdout: IO[bytes] | None = None, check: bool = True
    ) -> None:
        run = subprocess.run(
            [str(self._bindir / program), *args],
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.home,
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
            extra_groups=[] if self._user else None,
            check=False,
        )
        if check and run.returncode != 0:
            output = run.stdout.decode(errors="replace") if run.stdout else self.log_tail()
            raise RuntimeError(f"{program} {args[0]} failed ({run.returncode}):\n{output}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP: its postmaster and every server process) for the block,
        its connections open: a frozen server, or a stalled host whose kernel still answers
        TCP."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        processes = [postmaster, *_children(postmaster)]
        for pid in processes:
            os.kill(pid, signal.SIGSTOP)
        try:
            for pid in processes:
                wait_stopped(pid)
            yield
        finally:
            for pid in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def halt(self) -> None:
        """Stop the server, keeping its cluster for ``resume`` (an outage)."""
        self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))

    def resume(self) -> None:
        """Start the server ``halt`` stopped, on its port."""
        with self.log_path.open("ab") as log:
            self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT), "-D", str(self.data),
                      stdout=log)  # fmt: skip

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``: open sessions are ended) and delete its
        cluster."""
        if self._started:
            self._started = False
            # Not checked: after a failed start there may be no server to stop.
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data), check=False)
        if self.home != self.root:
            shutil.rmtree(self.home, ignore_errors=True)


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (from /proc)."""
    children = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent:
                children.append(int(Path(stat).parent.name))
    return children


def start_postgres(tmpdir: Path | str, port: int | None = None) -> PostgresServer:
    """Initialise and start a cluster logging into ``tmpdir`` (on ``port``, else a free one);
    the caller stops it."""
    reason = postgres_missing()
    if reason is not None:
        raise RuntimeError(f"cannot start PostgreSQL: {reason}")
    return PostgresServer(Path(tmpdir), port)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    reason = postgres_missing()
    if reason is not None:
        unavailable("PostgreSQL", reason)
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """``postgresql://riverbed@127.0.0.1:PORT/riverbed`` of the session's server."""
    return postgres_server.url


def terminate_connections(url: str, application_name: str) -> int:
    """End the server processes of the connections that gave ``application_name``, as a server
    restart or a network failure would; how many there were."""
    with psycopg.connect(url, autocommit=True) as admin:
        return len(
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (application_name,),
            ).fetchall()
        )
