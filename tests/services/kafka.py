"""A real Apache Kafka 4.x broker for the tests: one KRaft node (broker and controller in one
JVM), on free loopback ports in a temp dir, from the jars ``make test-deps`` fetches (``pom.xml``).

``kafka_url`` is the session fixture; ``start_kafka`` is the same broker for scripts (benchmarks).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

import riverbed
from riverbed.log.kafka import KafkaLog
from tests.services import free_port, unavailable, wait_stopped

KAFKA_LIBS = Path(__file__).resolve().parents[2] / ".cache" / "kafka" / "libs"
JVM_OPTIONS = ["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]
START_TIMEOUT = 60.0

# Settings that make a one-node broker start fast and act fast in tests: internal topics with one
# replica and few partitions, no delay before a group's first rebalance, short sessions allowed,
# and retention/compaction checked every second on segments rolled every 100 ms (Kafka deletes and
# compacts only closed segments), so tests of them finish quickly.
BROKER_SETTINGS = {
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    # A killed producer's open transaction holds back read_committed consumers until the broker
    # aborts it on its timeout; look for timed-out transactions every second, not every ten.
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.num.partitions": "4",
    "group.initial.rebalance.delay.ms": "0",
    "group.min.session.timeout.ms": "1000",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "log.roll.ms": "100",
    "log.retention.check.interval.ms": "1000",
    "log.cleaner.backoff.ms": "500",
    "log.cleaner.min.cleanable.ratio": "0.01",
    "log.segment.delete.delay.ms": "0",
    "log.initial.task.delay.ms": "0",
}

LOG4J2 = """\
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def kafka_missing() -> str | None:
    """Why no test broker can start here, or None if it can."""
    if shutil.which("java") is None:
        return "no `java` on PATH; install Java 17+ and run `make test-deps`"
    if not list(KAFKA_LIBS.glob("kafka_2.13-*.jar")):
        return f"no Kafka jars in {KAFKA_LIBS}; run `make test-deps`"
    return None


class KafkaServer:
    """One KRaft node whose storage lives in ``root``; ``stop`` then ``start`` keeps its data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.controller_port = free_port()
        self.log_path = root / "broker.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._configure()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The broker stopped (SIGSTOP) while the block runs: it takes no request and closes
        no connection, as a hung machine would."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(self._process.pid)
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def _configure(self) -> None:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.root / "data"),
            **BROKER_SETTINGS,
        }
        self.config_path = self.root / "server.properties"
        self.config_path.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (self.root / "log4j2.properties").write_text(LOG4J2)
        formatted = subprocess.run(
            [
                "java",
                *JVM_OPTIONS,
                "-cp",
                f"{KAFKA_LIBS}/*",
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                # One argument: an id may start with '-', which would otherwise read as an option.
                f"--cluster-id={_cluster_id()}",
                "--config",
                str(self.config_path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if formatted.returncode != 0:
            raise RuntimeError(
                f"formatting Kafka storage in {self.root} failed:\n{formatted.stdout.decode()}"
            )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the JVM and wait until a client gets metadata from it."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    "java",
                    *JVM_OPTIONS,
                    f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
                    "-cp",
                    f"{KAFKA_LIBS}/*",
                    "kafka.Kafka",
                    str(self.config_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with status {self._process.returncode} while starting; "
                    f"{self.log_path} ends with:\n{self.log_tail()}"
                )
            try:
                if admin.list_topics(timeout=0.5).brokers:
                    return
            except Exception:  # KafkaException until the listener accepts requests
                time.sleep(0.1)
        raise RuntimeError(
            f"Kafka did not answer on {self.bootstrap} within {timeout:.0f} s; "
            f"{self.log_path} ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Shut down cleanly (SIGTERM), or SIGKILL after ``timeout`` seconds."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL), as a power cut would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _cluster_id() -> str:
    # What `kafka-storage random-uuid` prints: a random UUID in URL-safe base64 without padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def start_kafka(tmpdir: Path | str) -> KafkaServer:
    """Format a fresh node in ``tmpdir`` and start it; the caller stops it."""
    reason = kafka_missing()
    if reason is not None:
        raise RuntimeError(f"cannot start Kafka: {reason}")
    server = KafkaServer(Path(tmpdir))
    server.start()
    return server


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    reason = kafka_missing()
    if reason is not None:
        unavailable("Kafka", reason)
    server = start_kafka(tmp_path_factory.mktemp("kafka"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_url(kafka_server: KafkaServer) -> str:
    """``kafka://127.0.0.1:PORT`` of the session's broker."""
    return kafka_server.url


@pytest.fixture
def kafka_log(kafka_url: str) -> Iterator[KafkaLog]:
    """The session broker's log, for a test."""
    opened = riverbed.connect(kafka_url)
    assert isinstance(opened, KafkaLog)
    with opened:
        yield opened
