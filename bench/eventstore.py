"""The event-store benchmark: riverbed's event sourcing against the `eventsourcing` library.

Every system runs the same workload in the same run on the same machine, each on a store of its
own: a new SQLite file in the same temp dir, or a new database on the one PostgreSQL server the
script starts (``tests/services/postgres.py``). ``--aggregates`` orders (default 2,000) of
``--events`` events each (default 10: placed, then lines added):

1. save per command: each command saved at once (20,000 saves);
2. save per aggregate: the 10 commands, then one save (2,000 saves), into the same store;
3. load: every aggregate of phase 2 by id;
4. read all: every stored event (both phases: 40,000) by global position, a page at a time, as
   stored records and again decoded into typed events;
5. relay (riverbed only): its outbox relay publishing every stored event to the embedded log.

riverbed runs in this process; eventsourcing as a subprocess in bench/.venv-peers
(``bench/peers/eventsourcing_bench.py``; ``make bench-peers``). It prints the medians of ``--runs``
runs and appends them to ``bench/RESULTS.md``; ``bench/README.md`` explains the figures. Run::

    .venv/bin/python bench/eventstore.py [--runs R] [--systems sqlite,eventsourcing-postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import common  # bench/common.py: python puts bench/ first on sys.path
from rich.console import Console

riverbed, RIVERBED_IMPORT_ERROR = common.import_riverbed()
DRIVER = common.PEERS / "eventsourcing_bench.py"
PEER_PACKAGES = ("eventsourcing", "psycopg", "psycopg-binary", "psycopg-pool")

# The workload
AGGREGATES = 2_000
EVENTS = 10  # per aggregate: the creation, then EVENTS - 1 commands
PAGE = 5_000  # events per read-all page (both systems) and per relay batch
WARMUP_AGGREGATES = 200
TIMEOUT = 900.0  # s for one run of one system
RELAY_TOPIC = "orders"

# eventsourcing's settings (see bench/README.md): its documented environment, snapshotting off.
# On PostgreSQL its insert function (one round trip per save; the library's own speed runs use
# it) was 1.6-2.5x faster on saves here than its default pipelined INSERTs.
PEER_ENV_SQLITE = {"PERSISTENCE_MODULE": "eventsourcing.sqlite"}
PEER_ENV_POSTGRES = {
    "PERSISTENCE_MODULE": "eventsourcing.postgres",
    "POSTGRES_ENABLE_DB_FUNCTIONS": "y",
}

SYSTEMS = (
    "riverbed-sqlite",
    "riverbed-sqlite-always",
    "eventsourcing-sqlite",
    "riverbed-postgres",
    "riverbed-postgres-nospin",
    "eventsourcing-postgres",
)
ALIASES = {
    "riverbed": (
        "riverbed-sqlite", "riverbed-sqlite-always", "riverbed-postgres",
        "riverbed-postgres-nospin",
    ),
    "eventsourcing": ("eventsourcing-sqlite", "eventsourcing-postgres"),
    "sqlite": ("riverbed-sqlite", "riverbed-sqlite-always", "eventsourcing-sqlite"),
    "postgres": ("riverbed-postgres", "riverbed-postgres-nospin", "eventsourcing-postgres"),
}  # fmt: skip
# The URL options of the riverbed systems that are not its defaults.
URL_OPTIONS = {"riverbed-sqlite-always": "fsync=always", "riverbed-postgres-nospin": "spin_us=0"}
POSTGRES_SYSTEMS = frozenset(ALIASES["postgres"])


@dataclass(frozen=True)
class Phase:
    key: str
    column: str
    unit: str  # what the count counts


PHASES = (
    Phase("save_per_command", "save per command events/s", "events"),
    Phase("save_per_aggregate", "save per aggregate events/s", "events"),
    Phase("load", "load aggregates/s", "aggregates"),
    Phase("read_all", "read all events/s", "events"),
    Phase("read_all_decoded", "read all decoded events/s", "events"),
    Phase("relay", "relay events/s", "events"),
)

TARGETS_NOTE = (
    "riverbed >= 2x eventsourcing on saves per command and >= 5x on saves per aggregate (on "
    "each backend); read all >= 500,000 events/s on SQLite and >= 200,000 on PostgreSQL; the "
    "relay publishes >= 50,000 events/s to the embedded log"
)


# The servers and stores


class Postgres:
    """The benchmark's PostgreSQL server: one new database per system and run."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.port: int = server.port

    def create(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.server.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.server.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def url(self, database: str) -> str:
        return f"postgresql://riverbed@127.0.0.1:{self.port}/{database}"

    def peer_env(self, database: str) -> dict[str, str]:
        return {
            **PEER_ENV_POSTGRES,
            "POSTGRES_DBNAME": database,
            "POSTGRES_HOST": "127.0.0.1",
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": "riverbed",
            "POSTGRES_PASSWORD": "",  # trust authentication on the loopback
        }


@contextlib.contextmanager
def postgres_server(root: Path) -> Iterator[Postgres]:
    """The tests' PostgreSQL (tests/services/postgres.py), stopped and deleted at the end."""
    common.tests_importable()
    from tests.services.postgres import start_postgres

    with common.running(lambda: start_postgres(root)) as server:
        yield Postgres(server)


def postgres_version(postgres: Postgres | None) -> str:
    if postgres is None:
        return "not started"
    import psycopg

    with psycopg.connect(postgres.server.admin_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


# The systems


@dataclass(frozen=True)
class Outcome:
    """One run of one system: per phase, what it counted and the seconds it took."""

    counts: dict[str, int]
    seconds: dict[str, float]

    def rate(self, phase: str) -> float | None:
        if phase not in self.seconds or not self.seconds[phase]:
            return None
        return self.counts[phase] / self.seconds[phase]


class System(Protocol):
    name: str

    def run(self, aggregates: int, tag: str) -> Outcome:
        """The workload on a new store of this system's (``tag`` names it)."""
        ...


def riverbed_order_class() -> type:
    """The riverbed aggregate: the same two events as the peer's ``Order``."""

    class Order(riverbed.Aggregate):  # type: ignore[name-defined,misc]
        customer: str
        lines: list[str]

        @riverbed.event("Placed")
        def __init__(self, customer: str) -> None:
            self.customer = customer
            self.lines = []

        @riverbed.event("LineAdded")
        def add_line(self, sku: str) -> None:
            self.lines.append(sku)

    return Order


class RiverbedEvents:
    """``riverbed.eventsourcing.EventSourcing`` in this process; the relay publishes to
    ``riverbed.connect("sqlite:///<run dir>/log.db")``."""

    def __init__(
        self,
        name: str,
        root: Path,
        order: type,
        events: int,
        page: int,
        postgres: Postgres | None = None,
        options: str | None = None,
    ) -> None:
        self.name = name
        self._root = root
        self._order = order
        self._events = events
        self._page = page
        self._postgres = postgres
        self._options = options

    def run(self, aggregates: int, tag: str) -> Outcome:
        from riverbed.eventsourcing import EventSourcing, Relay

        directory = self._root / tag
        directory.mkdir()
        database = None
        if self._postgres is not None:
            database = self._postgres.create(f"rb_{tag}")
            url = self._postgres.url(database)
        else:
            url = f"sqlite:///{directory / 'events.db'}"
        if self._options is not None:
            url += f"?{self._options}"
        store = EventSourcing(f"bench-{tag}", url)
        log = riverbed.connect(f"sqlite:///{directory / 'log.db'}")
        try:
            counts, seconds = self._phases(store, aggregates)
            relay = Relay(store, log, RELAY_TOPIC)  # creates the topic: untimed
            try:
                gc.collect()
                started = time.perf_counter()
                published = 0
                while True:
                    done = relay.run_once(limit=self._page)
                    if not done:
                        break
                    published += done
                seconds["relay"] = time.perf_counter() - started
            finally:
                relay.close()
            in_log = sum(log.end_offsets(RELAY_TOPIC).values())
            expected = counts["read_all"]
            if published != expected or in_log != expected:
                raise common.BenchError(
                    f"the relay published {published} events and the topic holds {in_log}; "
                    f"the store holds {expected}"
                )
            counts["relay"] = published
            return Outcome(counts, seconds)
        finally:
            with contextlib.suppress(Exception):
                log.close()
            with contextlib.suppress(Exception):
                store.close()
            if database is not None and self._postgres is not None:
                with contextlib.suppress(Exception):
                    self._postgres.drop(database)

    def _phases(self, store: Any, aggregates: int) -> tuple[dict[str, int], dict[str, float]]:
        """The same phases, in the same order, as bench/peers/eventsourcing_bench.py."""
        order_class, events, page = self._order, self._events, self._page
        save = store.save
        counts: dict[str, int] = {}
        seconds: dict[str, float] = {}

        gc.collect()
        started = time.perf_counter()
        for i in range(aggregates):
            order = order_class(f"customer-{i}")
            save(order)
            for j in range(1, events):
                order.add_line(f"sku-{j}")
                save(order)
        seconds["save_per_command"] = time.perf_counter() - started
        counts["save_per_command"] = aggregates * events

        gc.collect()
        started = time.perf_counter()
        ids = []
        for i in range(aggregates):
            order = order_class(f"customer-{i}")
            for j in range(1, events):
                order.add_line(f"sku-{j}")
            save(order)
            ids.append(order.id)
        seconds["save_per_aggregate"] = time.perf_counter() - started
        counts["save_per_aggregate"] = aggregates * events

        gc.collect()
        get = store.get
        started = time.perf_counter()
        for aggregate_id in ids:
            order = get(order_class, aggregate_id)
            if order.version != events or len(order.lines) != events - 1:
                raise common.BenchError(f"loaded {order!r}, expected version {events}")
        seconds["load"] = time.perf_counter() - started
        counts["load"] = len(ids)

        expected = 2 * aggregates * events
        readers: dict[str, Callable[[int, int], list[Any]]] = {
            "read_all": store.store.read_all,
            "read_all_decoded": store.read,
        }
        for phase, read in readers.items():
            gc.collect()
            started = time.perf_counter()
            last = count = 0
            while True:
                batch = read(last, page)
                if not batch:
                    break
                count += len(batch)
                last = batch[-1].position
            seconds[phase] = time.perf_counter() - started
            counts[phase] = count
            if count != expected or last != expected:
                raise common.BenchError(
                    f"{phase} read {count} events up to position {last}; expected {expected}"
                )
        return counts, seconds


class PeerEvents:
    """eventsourcing, as ``bench/peers/eventsourcing_bench.py`` in bench/.venv-peers: a new
    process per run, which first runs the phases unrecorded on a store of its own."""

    def __init__(
        self,
        name: str,
        root: Path,
        events: int,
        page: int,
        warmup: int,
        timeout: float,
        postgres: Postgres | None = None,
    ) -> None:
        self.name = name
        self._root = root
        self._events = events
        self._page = page
        self._warmup = warmup
        self._timeout = timeout
        self._postgres = postgres

    def run(self, aggregates: int, tag: str) -> Outcome:
        directory = self._root / tag
        directory.mkdir()
        databases: list[str] = []
        try:
            if self._postgres is not None:
                databases = [
                    self._postgres.create(f"es_{tag}"),
                    self._postgres.create(f"esw_{tag}"),
                ]
                env = self._postgres.peer_env(databases[0])
                warmup_env = self._postgres.peer_env(databases[1])
            else:
                env = {**PEER_ENV_SQLITE, "SQLITE_DBNAME": str(directory / "events.db")}
                warmup_env = {**PEER_ENV_SQLITE, "SQLITE_DBNAME": str(directory / "warmup.db")}
            config: dict[str, Any] = {
                "env": env,
                "aggregates": aggregates,
                "events": self._events,
                "page": self._page,
            }
            if self._warmup:
                config["warmup"] = {"env": warmup_env, "aggregates": self._warmup}
            answer = run_driver(config, directory / "peer.log", self._timeout)
            return Outcome(answer["counts"], answer["seconds"])
        finally:
            if self._postgres is not None:
                for database in databases:
                    with contextlib.suppress(Exception):
                        self._postgres.drop(database)


def run_driver(config: dict[str, Any], log_path: Path, timeout: float) -> dict[str, Any]:
    """The driver's JSON answer; its stderr goes to ``log_path``."""
    with log_path.open("wb") as log:
        try:
            done = subprocess.run(
                [str(common.PEER_PYTHON), str(DRIVER), json.dumps(config)],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                check=False,
                cwd=log_path.parent,
            )
        except subprocess.TimeoutExpired:
            raise common.BenchError(
                f"the eventsourcing driver took more than {timeout:g} s"
            ) from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        errors = log_path.read_text(errors="replace").strip().splitlines()
        reason = next((line for line in reversed(errors) if line.strip()), "no output")
        raise common.BenchError(f"the eventsourcing driver exited with {done.returncode}: {reason}")
    try:
        answer: dict[str, Any] = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise common.BenchError(f"the eventsourcing driver printed {lines[-1][:200]!r}") from None
    return answer


def open_systems(
    args: argparse.Namespace, stack: contextlib.ExitStack, root: Path, peers: dict[str, str]
) -> tuple[list[System], Postgres | None]:
    """Start PostgreSQL if a chosen system needs it; ``stack`` stops it."""
    postgres: Postgres | None = None
    postgres_problem: str | None = None
    if POSTGRES_SYSTEMS & set(args.systems):
        (root / "postgres").mkdir()
        try:
            postgres = stack.enter_context(postgres_server(root / "postgres"))
        except common.BenchError as error:
            postgres_problem = f"PostgreSQL did not start: {error}"
    work = root / "runs"
    work.mkdir()
    order = riverbed_order_class() if riverbed is not None else None
    systems: list[System] = []
    for name in args.systems:
        on_postgres = name in POSTGRES_SYSTEMS
        if on_postgres and postgres is None:
            systems.append(common.Unavailable(name, postgres_problem or "no PostgreSQL"))
        elif name.startswith("riverbed-"):
            if RIVERBED_IMPORT_ERROR is not None or order is None:
                systems.append(common.Unavailable(name, RIVERBED_IMPORT_ERROR or "no riverbed"))
                continue
            systems.append(
                RiverbedEvents(
                    name,
                    work,
                    order,
                    args.events,
                    args.page,
                    postgres if on_postgres else None,
                    URL_OPTIONS.get(name),
                )
            )
        elif not peers:
            systems.append(common.Unavailable(name, "no bench/.venv-peers: run `make bench-peers`"))
        elif "eventsourcing" not in peers:
            systems.append(
                common.Unavailable(
                    name,
                    "eventsourcing is not installed in bench/.venv-peers: run `make bench-peers`",
                )
            )
        else:
            systems.append(
                PeerEvents(
                    name,
                    work,
                    args.events,
                    args.page,
                    args.warmup_aggregates,
                    args.timeout,
                    postgres if on_postgres else None,
                )
            )
    return systems, postgres


# Results


class Results(common.Runs[Outcome]):
    def rate(self, phase: str) -> float | None:
        rates = [r for r in (o.rate(phase) for o in self.outcomes) if r is not None]
        return statistics.median(rates) if rates else None


def at_least(system: str, phase: str, bound: float) -> common.Target[Results]:
    def check(results: dict[str, Results]) -> tuple[str, bool] | None:
        rate = results[system].rate(phase) if system in results else None
        return None if rate is None else (f"{rate:,.0f} events/s", rate >= bound)

    label = phase.replace("_", " ")
    return common.Target(system, phase, f"{label} >= {bound:,.0f} events/s", check)


def ratio(system: str, peer: str, phase: str, factor: float) -> common.Target[Results]:
    check: common.Check[Results] = common.ratio_check(
        system, peer, factor, lambda result: result.rate(phase)
    )
    label = phase.replace("_", " ")
    return common.Target(system, phase, f"{label} >= {factor:g}x {peer}", check)


TARGETS = (
    ratio("riverbed-sqlite", "eventsourcing-sqlite", "save_per_command", 2.0),
    ratio("riverbed-sqlite", "eventsourcing-sqlite", "save_per_aggregate", 5.0),
    ratio("riverbed-sqlite-always", "eventsourcing-sqlite", "save_per_command", 2.0),
    ratio("riverbed-sqlite-always", "eventsourcing-sqlite", "save_per_aggregate", 5.0),
    ratio("riverbed-postgres", "eventsourcing-postgres", "save_per_command", 2.0),
    ratio("riverbed-postgres", "eventsourcing-postgres", "save_per_aggregate", 5.0),
    ratio("riverbed-postgres-nospin", "eventsourcing-postgres", "save_per_command", 2.0),
    ratio("riverbed-postgres-nospin", "eventsourcing-postgres", "save_per_aggregate", 5.0),
    at_least("riverbed-sqlite", "read_all", 500_000),
    at_least("riverbed-postgres", "read_all", 200_000),
    at_least("riverbed-sqlite", "relay", 50_000),
    at_least("riverbed-postgres", "relay", 50_000),
)
COLUMNS = ("system", *(phase.column for phase in PHASES), "runs")


def table_rows(results: dict[str, Results]) -> list[list[str]]:
    marks = common.target_marks(TARGETS, results)
    rows = []
    for name, result in results.items():
        if not result.outcomes:
            rows.append(result.failed_row(name, len(COLUMNS)))
            continue
        cells = []
        for phase in PHASES:
            rate = result.rate(phase.key)
            cells.append("-" if rate is None else f"{rate:,.0f}" + marks.get((name, phase.key), ""))
        rows.append([name, *cells, result.tally()])
    return rows


def result_tables(results: dict[str, Results], args: argparse.Namespace) -> common.Tables:
    title = (
        f"event store benchmark: {args.aggregates:,} aggregates x {args.events} events "
        f"(median of {args.runs} runs)"
    )
    targets = common.target_rows(TARGETS, results)
    return common.Tables(title, COLUMNS, table_rows(results), targets)


def versions(peers: dict[str, str], postgres: str, revision: str) -> str:
    version = riverbed.__version__ if riverbed is not None else "(does not import)"
    ours = []
    for package in ("msgspec", "psycopg"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            ours.append(f"{package} {importlib.metadata.version(package)}")
    peer_text = ", ".join(f"{name} {version}" for name, version in peers.items()) or "none"
    import sqlite3

    return (
        f"riverbed {version} ({revision}), Python {platform.python_version()}, "
        f"{', '.join(ours)}, SQLite {sqlite3.sqlite_version}; peer (bench/.venv-peers, "
        f"Python 3.11): {peer_text}; server: {postgres}"
    )


def settings_notes(args: argparse.Namespace) -> list[str]:
    total = 2 * args.aggregates * args.events
    notes = [
        f"Workload: {args.aggregates:,} orders x {args.events} events (`Placed(customer)`, then "
        f"{args.events - 1} x `LineAdded(sku)`), on a new store per system and run. Phase 1 saves "
        f"after every command ({args.aggregates * args.events:,} saves), phase 2 makes the "
        f"{args.events} commands then saves once per order ({args.aggregates:,} saves) into the "
        f"same store; save figures are events/s including the commands themselves. Load: every "
        f"order of phase 2 by id, checked for version {args.events} (aggregates/s). Read all: "
        f"all {total:,} stored events from position 0 in pages of {args.page:,}, as stored "
        "records (`read all`) and again decoded into typed events (`read all decoded`). Relay: "
        f"riverbed's outbox relay publishing the {total:,} events to a 4-partition topic of the "
        f"embedded log (`riverbed.connect('sqlite:///<run dir>/log.db')`, default fsync=normal), "
        f"`Relay.run_once(limit={args.page:,})` until it returns 0, checked against the "
        "topic's end offsets. Each system runs one phase after the other in one thread; "
        "`gc.collect()` before each phase, GC enabled during it.",
        "riverbed (in this process): `riverbed.eventsourcing.EventSourcing(name, url)`, an "
        "`Aggregate` with two `@riverbed.event` methods (no snapshots), `events.save(order)`, "
        "`events.get(Order, id)`, `events.store.read_all(after, limit)` (raw `StoredEvent`s) and "
        "`events.read(after, limit)` (decoded `Envelope`s). riverbed-sqlite: "
        "`sqlite:///<run dir>/events.db` with its default `fsync=normal` (WAL, "
        "synchronous=NORMAL: commits do not wait for the disk); riverbed-sqlite-always: "
        "`?fsync=always` (synchronous=FULL, the durability eventsourcing's SQLite has). "
        "riverbed-postgres: `postgresql://riverbed@127.0.0.1:PORT/<new database>` (its default "
        "pool; a save's wait for the server's answer polls without sleeping for up to its "
        "default `spin_us=200` microseconds, then sleeps); riverbed-postgres-nospin: the same "
        "with `?spin_us=0` (it sleeps at once, as eventsourcing's psycopg does). One unrecorded "
        "warm-up run per riverbed system "
        f"({args.warmup_aggregates:,} aggregates) before the measured runs.",
        "eventsourcing (bench/peers/eventsourcing_bench.py, a new bench/.venv-peers process per "
        "run): an `Application` configured by its environment, `eventsourcing.domain.Aggregate` "
        "with two `@event` methods, `app.save(order)`, `app.repository.get(id)`, "
        "`app.recorder.select_notifications(last, limit, inclusive_of_start=False)` (raw "
        "`Notification`s) and the same plus `app.mapper.to_domain_event` (decoded). "
        "eventsourcing-sqlite: `PERSISTENCE_MODULE=eventsourcing.sqlite`, `SQLITE_DBNAME=<run "
        "dir>/events.db` (a file: it switches it to WAL; it sets no `synchronous`, so SQLite's "
        "FULL applies, and there is no setting for it). eventsourcing-postgres: "
        "`PERSISTENCE_MODULE=eventsourcing.postgres`, `POSTGRES_DBNAME/HOST/PORT/USER/PASSWORD` "
        "(a new database), `POSTGRES_ENABLE_DB_FUNCTIONS=y` (its insert function: one round "
        "trip per save, as in the library's own speed runs; 1.6-2.5x its default on saves "
        "here), default pool (5 + 10 overflow; a pool of 1 was slower on loads and reads). "
        "Both: snapshotting off (`IS_SNAPSHOTTING_ENABLED` unset, no `snapshotting_intervals`), "
        "no aggregate cache (`AGGREGATE_CACHE_MAXSIZE` unset, so loads read the store), the "
        "default JSON transcoder, UUID originator ids, no cipher or compressor. Each process "
        f"first runs the phases unrecorded on a store of its own ({args.warmup_aggregates:,} "
        "aggregates).",
        "PostgreSQL: one server for both systems, started by the script (tests/services/"
        "postgres.py: initdb into a temp dir, loopback, trust auth, fsync=off, "
        "synchronous_commit=off, full_page_writes=off, shared_buffers=32MB), a new database per "
        "system and run, dropped after. SQLite files: each system's own file in one temp dir on "
        "the same file system. Every figure is the median of the runs; systems alternate within "
        "each run. The machine's 2 cores are shared with the PostgreSQL server and, possibly, "
        "other work (see the load average).",
    ]
    if args.one_cpu:
        notes.append(
            "`--one-cpu`: this script, the PostgreSQL server and the peers' processes all ran "
            "on CPU 0 (`sched_setaffinity`), so a client and its server backend take turns on "
            "one CPU instead of waking each other across two."
        )
    return notes


def append_results(
    args: argparse.Namespace,
    results: dict[str, Results],
    report: common.Report,
    tables: common.Tables,
    peers: dict[str, str],
    postgres: str,
    revision: str,
) -> None:
    lines = report.section(versions(peers, postgres, revision), tables, settings_notes(args))
    for name, result in results.items():
        runs = [
            "("
            + " / ".join(
                "-" if (rate := o.rate(phase.key)) is None else f"{rate:,.0f}" for phase in PHASES
            )
            + ")"
            for o in result.outcomes
        ]
        lines.append(result.runs_line(name, runs, ", "))
    common.write_results(lines)


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aggregates", type=int, default=AGGREGATES, help="orders per run")
    parser.add_argument("--events", type=int, default=EVENTS, help="events per order (>= 1)")
    common.add_runs_argument(parser)
    common.add_systems_argument(parser, SYSTEMS, ALIASES)
    parser.add_argument(
        "--page", type=int, default=PAGE, help="events per read-all page and relay batch"
    )
    parser.add_argument(
        "--warmup-aggregates",
        type=int,
        default=WARMUP_AGGREGATES,
        help="aggregates of the unrecorded warm-up run (0: none)",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds one run of one peer may take"
    )
    parser.add_argument(
        "--one-cpu",
        action="store_true",
        help="run everything (this script, PostgreSQL, the peers) on CPU 0, which spares each "
        "round trip the wake-up of a process on the other CPU",
    )
    common.add_no_results_argument(parser)
    args = parser.parse_args(argv)
    if args.events < 1 or args.aggregates < 1 or args.page < 1:
        parser.error("--aggregates, --events and --page must be at least 1")
    args.systems = common.chosen_systems(parser, args.systems, SYSTEMS, ALIASES)
    return args


def describe(outcome: Outcome) -> str:
    parts = []
    for phase in PHASES:
        rate = outcome.rate(phase.key)
        if rate is not None:
            parts.append(f"{phase.key} {rate:,.0f}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one_cpu:  # before the server and the peers start: they inherit it
        os.sched_setaffinity(0, {0})
    common.stop_on_signals()
    # Not a terminal (a log file): wide enough for the table's seven figures.
    console = Console() if sys.stdout.isatty() else Console(width=170)
    report = common.Report(
        "Event store",
        "bench/eventstore.py",
        TARGETS_NOTE,
        "each: " + " / ".join(phase.column for phase in PHASES),
    )
    # Read before riverbed runs: a commit landing during the run must not be credited with it.
    revision = common.git_revision()
    peers = common.peer_versions(PEER_PACKAGES)
    console.log(f"peers venv: {peers or 'missing'}")
    results = {name: Results() for name in args.systems}
    postgres_text = "not started"
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="riverbed-es-")))
        with console.status("starting PostgreSQL"):
            systems, postgres = open_systems(args, stack, root, peers)
        if postgres is not None:
            postgres_text = postgres_version(postgres)
        if args.warmup_aggregates:
            for system in systems:
                if isinstance(system, RiverbedEvents):  # the peer warms up in each process
                    with console.status(f"warming up {system.name}"):
                        outcome = common.outcome_or_failure(
                            system.run, args.warmup_aggregates, warm_tag()
                        )
                    if isinstance(outcome, str):
                        console.log(
                            f"warm-up {system.name}: [red]failed[/] {common.short(outcome, 300)}"
                        )
        for run in range(1, args.runs + 1):
            for system in systems:
                with console.status(f"run {run}/{args.runs}: {system.name}"):
                    tag = f"r{run}_{uuid.uuid4().hex[:8]}"
                    outcome = common.outcome_or_failure(system.run, args.aggregates, tag)
                if isinstance(outcome, str):
                    results[system.name].failures.append(outcome)
                    console.log(
                        f"run {run} {system.name}: [red]failed[/] {common.short(outcome, 300)}"
                    )
                else:
                    results[system.name].outcomes.append(outcome)
                    console.log(f"run {run} {system.name}: {describe(outcome)}")
    report.stop()
    tables = result_tables(results, args)
    tables.print(console)
    console.print(report.summary())
    if not args.no_results:
        append_results(args, results, report, tables, peers, postgres_text, revision)
        console.print(f"appended to {common.RESULTS.relative_to(common.ROOT)}")
    return 0


def warm_tag() -> str:
    return f"w_{uuid.uuid4().hex[:8]}"


if __name__ == "__main__":
    sys.exit(main())
