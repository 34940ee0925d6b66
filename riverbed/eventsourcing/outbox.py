"""The outbox relay: stored events published to a log topic, and the inbox that drops repeats.

The relay reads the store in global order and sends each event to the topic keyed by its stream
id, so one aggregate's events land in one partition in order. It records how far it got (a
checkpoint in the store) only after the log has acknowledged the batch: after a crash it
publishes again at most the batch that was not acknowledged, never skipping or reordering one.
Records carry the stored payload as it is (personal fields still encrypted, so crypto-shredding
reaches the log too) and the event's id, type, schema version, stream, version, position and
correlation and causation ids in headers. Consumers drop the repeats with ``Inbox``.

Every worker process may run the relay of a topic: the relays elect a leader through a lease in
the store, as Kafka Connect runs one task per connector. Only the lease's holder publishes; it
renews the lease with each page and, when idle, at least every third of its time to live, and
gives it up when it stops. The others stand by and take over once it is given up or expires (the
leader died). Publishing stays at-least-once: a checkpoint commits only while its relay still
holds the lease, so a leader that stalled past it moves nothing once another has taken over, and
the successor, starting from the last checkpoint, publishes again the page its predecessor
published but did not checkpoint; the inbox drops those repeats by event id.

The relay waits at most ``FLUSH_TIMEOUT_S`` for the log to acknowledge a page, so that ``stop``
is honoured within seconds: a log that does not (Kafka down) is an outage it waits out like the
others. The page, not checkpointed, stays queued in the producer, and the relay waits for those
records rather than queueing the page again behind them (each retry would add a copy); it sends
the page again only when the log reports a record failed. ``app.events.run`` closes its relays
when they stop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from riverbed.collection import collection_deferred
from riverbed.eventsourcing.aggregate import check_name
from riverbed.eventsourcing.claims import claim
from riverbed.eventsourcing.errors import EventSourcingError, refuse_awaitable
from riverbed.eventsourcing.outages import UNREACHABLE, Outage
from riverbed.eventsourcing.records import StoredEvent, metadata_of
from riverbed.eventsourcing.repository import APP_KEY, causing
from riverbed.eventsourcing.stores.api import Transaction
from riverbed.ids import random_id
from riverbed.log.api import (
    DEFAULT_MAX_RECORD_BYTES,
    KeyValueHeaders,
    Log,
    Producer,
    Record,
    SendFuture,
    TopicInfo,
)
from riverbed.log.errors import BrokerUnavailableError, RecordTooLargeError, TopicExistsError

if TYPE_CHECKING:
    from riverbed.eventsourcing.repository import Events

PAGE = 5000
LEASE_TTL_S = 10.0
MAX_LEASE_TTL_S = 86_400
# How long a page (or closing) waits for the log's acknowledgement: Kafka's own delivery timeout
# is a minute, which would hold up stopping.
FLUSH_TIMEOUT_S = 5.0
EVENT_ID = "riverbed-event-id"
EVENT_TYPE = "riverbed-event-type"
EVENT_SCHEMA = "riverbed-event-schema"
STREAM = "riverbed-stream"
STREAM_VERSION = "riverbed-stream-version"
POSITION = "riverbed-position"
# The event's time (Unix milliseconds): the record's own is when the relay sent it, which the
# topic's retention and timestamp limits go by (a backlog relayed late is not deleted at once).
EVENT_TIME = "riverbed-event-time"
CORRELATION = "riverbed-correlation-id"
CAUSATION = "riverbed-causation-id"
APP = "riverbed-app"  # the app that saved the event
# The event's whole metadata (msgpack), sent only when the save gave metadata of its own.
METADATA = "riverbed-metadata"
_EVENT_HEADERS = (EVENT_ID, EVENT_TYPE, EVENT_SCHEMA, STREAM, STREAM_VERSION, POSITION)

logger = logging.getLogger("riverbed.outbox")


class _Sent(NamedTuple):
    """A page sent to the log: the checkpoint it was read after, its events, their futures
    (up to the record the log refused at once, if it did)."""

    after: int
    page: list[StoredEvent]
    futures: list[SendFuture]
    refused: RecordTooLargeError | None = None


def check_lease_ttl(lease_ttl: float) -> None:
    if not isinstance(lease_ttl, int | float) or not 0.01 <= lease_ttl <= MAX_LEASE_TTL_S:
        raise ValueError(
            f"lease_ttl={lease_ttl!r}: give the lease's length in seconds, from 0.01 to "
            f"{MAX_LEASE_TTL_S:,}"
        )


RELAY_PREFIX = "relay:"


def relay_name(topic: str) -> str:
    return f"{RELAY_PREFIX}{topic}"


def _warn_if_unlike(existing: TopicInfo, wanted: TopicInfo) -> None:
    """A topic that exists keeps its settings (an app's pipeline, another relay or a person made
    it first): say where they are not what the relay would have made."""
    if existing.partitions != wanted.partitions:
        logger.warning(
            "relay to %s: the topic exists with %d partitions; the relay asks for %d, and the "
            "topic keeps its own (riverbed does not repartition a topic); an app's topic() and "
            "relay() of one topic should give the same partitions",
            wanted.name, existing.partitions, wanted.partitions,
        )  # fmt: skip
    if existing.compact:
        logger.warning(
            "relay to %s: the topic is compacted, so it keeps only each aggregate's last event; "
            "consumers reading it from the beginning miss the others",
            wanted.name,
        )


class Relay:
    """Publishes the store's events to ``topic`` on ``log`` (created with ``partitions`` if
    missing), while it holds the lease of its name in the store: of the relays of one topic in
    any number of processes, one publishes and the others stand by (see the module's doc).
    ``lease_ttl``: seconds a leader that stopped renewing keeps the lease, so how long its
    successor waits after a crash; keep it well above the time a page takes to publish, or the
    leader loses the lease on the way."""

    def __init__(
        self,
        events: Events,
        log: Log | Callable[[], Log],
        topic: str,
        partitions: int = 4,
        *,
        lease_ttl: float = LEASE_TTL_S,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        check_lease_ttl(lease_ttl)
        self.events = events
        self.topic = topic
        self.name = relay_name(topic)
        self.owner = random_id()
        self.lease_ttl = lease_ttl
        self.leading = False  # whether it held the lease when it last tried
        self._log = log
        self._topic_settings = TopicInfo(topic, partitions, max_record_bytes=max_record_bytes)
        self._producer: Producer | None = None  # once the log is reached
        # The page whose flush timed out: its records are still queued in the producer.
        self._unacknowledged: _Sent | None = None

    def _ready(self) -> Producer:
        """The producer, once the log was reached and the topic exists (created if missing):
        a log out when the relay starts is waited out like one out later."""
        if self._producer is None:
            log = self._log() if callable(self._log) else self._log
            settings = self._topic_settings
            existing = {t.name: t for t in log.list_topics()}.get(settings.name)
            if existing is None:
                # Every worker process starts the relay: another may create the topic first.
                with contextlib.suppress(TopicExistsError):
                    log.create_topic(settings.name, partitions=settings.partitions,
                                     max_record_bytes=settings.max_record_bytes)  # fmt: skip
            else:
                _warn_if_unlike(existing, settings)
            self._producer = log.producer()
        return self._producer

    def run_once(self, limit: int = PAGE) -> int:
        """Take or renew the lease, then publish the next page of events and checkpoint it; how
        many were published and checkpointed: 0 with nothing new, when another relay holds the
        lease, or when this one lost it while publishing (its successor may publish the page
        again)."""
        with collection_deferred():  # a page's records and futures are garbage only at its end
            return self._publish_page(limit)

    def _publish_page(self, limit: int) -> int:
        producer = self._ready()
        store = self.events.store
        ttl_ms = int(self.lease_ttl * 1000)
        self.leading = store.acquire_lease(self.name, self.owner, ttl_ms)
        if not self.leading:
            # An unacknowledged page stays: its records are still queued, and if the lease
            # comes back at the same checkpoint, they are waited for, not queued again.
            return 0
        after = store.checkpoint(self.name)
        sent = self._unacknowledged
        if sent is None or sent.after != after:
            page = store.read_all(after, limit)
            if not page:
                return 0
            sent = self._send(producer, after, page)
        # Raises if the log did not take the page in time: nothing is checkpointed, and the next
        # call waits for these records instead of queueing the page again behind them.
        self._unacknowledged = sent
        producer.flush(FLUSH_TIMEOUT_S)
        self._unacknowledged = None
        # Kafka reports a record it failed to write only to its future: what the log took before
        # it is checkpointed, and the rest goes again (or the error says why it cannot).
        written, failure = _written(sent, self.topic)
        page = sent.page[:written]
        if not page:
            assert failure is not None
            raise failure
        with store.transaction(self.name) as tx:
            # The fence: once another relay has taken the lease over, the checkpoint is its own.
            self.leading = tx.renew_lease(self.name, self.owner, ttl_ms)
            if self.leading:
                tx.set_checkpoint(page[-1].position)
        if failure is not None:
            raise failure
        if self.leading:
            return len(page)
        logger.warning(
            "relay %s lost its lease while publishing positions %d-%d; another relay took over "
            "and may publish them again", self.name, page[0].position, page[-1].position,
        )  # fmt: skip
        return 0

    def _send(self, producer: Producer, after: int, page: list[StoredEvent]) -> _Sent:
        """Queue the page's records, up to one the log refuses at once (too large)."""
        records = _records(page)
        try:
            return _Sent(after, page, producer.send_batch(self.topic, records))
        except RecordTooLargeError:
            pass  # the batch queued none: the records before the refused one go one by one
        futures: list[SendFuture] = []
        for key, value, headers in records:
            try:
                futures.append(producer.send(self.topic, value, key=key, headers=headers))
            except RecordTooLargeError as error:
                return _Sent(after, page, futures, error)
        return _Sent(after, page, futures)

    def run(self, stop: threading.Event, idle_wait: float = 1.0) -> None:
        """Publish until ``stop`` is set, then give the lease up. Idle or standing by, it tries
        again every ``idle_wait`` seconds, and at least every third of ``lease_ttl``, which keeps
        an idle leader's lease alive."""
        wait = min(idle_wait, self.lease_ttl / 3)
        # Pauses short enough for the lease, which the relay renews between them.
        outage = Outage(self.name, max_pause=self.lease_ttl / 3)
        try:
            while not stop.is_set():
                try:
                    self._run_or_wait(stop, wait)
                except UNREACHABLE as error:
                    self._keep_lease()
                    outage.wait(error, stop)
                else:
                    if self.leading:  # a relay standing by did not reach the log
                        outage.over()
        finally:
            self._release()

    def _keep_lease(self) -> None:
        """Renew the lease while the log is unreachable, so that a leader waiting out the outage
        stays the leader (its page is still queued) instead of handing over every few pauses."""
        if not self.leading:
            return
        try:
            ttl_ms = int(self.lease_ttl * 1000)
            self.leading = self.events.store.acquire_lease(self.name, self.owner, ttl_ms)
        except BrokerUnavailableError:  # the store is out too: the next attempt tries again
            pass

    def _run_or_wait(self, stop: threading.Event, wait: float) -> None:
        if self.run_once() > 0:
            return
        store = self.events.store
        if self.leading:
            store.wait_for_events(store.checkpoint(self.name), wait)
        else:
            stop.wait(wait)

    def close(self) -> None:
        """Give the lease up, so a relay standing by takes over at once, and close the
        producer."""
        self._release()
        producer, self._producer = self._producer, None
        if producer is None:
            return  # it never reached the log
        try:
            producer.flush(FLUSH_TIMEOUT_S)
        except UNREACHABLE as error:
            # Not checkpointed, so published again by the next leader. Closing would wait for
            # the log (a minute on Kafka): it does so beside the caller.
            logger.warning("relay %s: closing before the log took its last page: %s",
                           self.name, error)  # fmt: skip
            threading.Thread(target=self._close_producer, args=(producer,),
                             name="riverbed-relay-closing", daemon=True).start()  # fmt: skip
        else:
            self._close_producer(producer)

    def _close_producer(self, producer: Producer) -> None:
        try:
            producer.close()
        except UNREACHABLE as error:
            logger.warning("relay %s: the log did not take its last page: %s", self.name, error)

    def _release(self) -> None:
        if not self.leading:
            return  # holds no lease
        try:
            self.events.store.release_lease(self.name, self.owner)
        except BrokerUnavailableError as error:  # the lease expires on its own
            logger.warning("relay %s could not give its lease up: %s", self.name, error)
        self.leading = False


def _written(sent: _Sent, topic: str) -> tuple[int, Exception | None]:
    """How many of a page's records, from its start, the log wrote; the error of the first one
    it did not."""
    for index, future in enumerate(sent.futures):
        try:
            error = future.exception(0)
        except TimeoutError as pending:  # the log has not taken it yet
            return index, pending
        if error is not None:
            if not isinstance(error, Exception):
                raise error
            return index, error
    if sent.refused is None:
        return len(sent.futures), None
    stored = sent.page[len(sent.futures)]
    return len(sent.futures), EventSourcingError(
        f"the event at position {stored.position} is a record of {sent.refused.size:,} bytes, "
        f"larger than the {sent.refused.limit:,}-byte limit of topic {topic!r}: "
        "app.events.relay(topic, max_record_bytes=N) creates the relay's topic with a higher "
        "limit (a topic that exists keeps its own: raise it there)"
    )


def _records(page: list[StoredEvent]) -> list[KeyValueHeaders]:
    """Each event's record: keyed by its stream, its payload, its headers. The events of one
    save share their metadata, so its headers are made once per save, not per event."""
    from_metadata: dict[bytes, dict[str, bytes]] = {}
    records: list[KeyValueHeaders] = []
    for stored in page:
        shared = from_metadata.get(stored.metadata)
        if shared is None:
            shared = from_metadata[stored.metadata] = _metadata_headers(stored)
        event_id = stored.id.encode()
        stream = stored.stream.encode()
        headers = {
            EVENT_ID: event_id,
            EVENT_TYPE: stored.type.encode(),
            EVENT_SCHEMA: b"%d" % stored.schema,
            STREAM: stream,
            STREAM_VERSION: b"%d" % stored.version,
            POSITION: b"%d" % stored.position,
            EVENT_TIME: b"%d" % stored.timestamp_ms,
            CORRELATION: event_id,  # an event saved without a cause correlates with itself
            **shared,
        }
        records.append((stream, stored.data, headers))
    return records


def _metadata_headers(stored: StoredEvent) -> dict[str, bytes]:
    """The headers an event's metadata gives: its cause, its app, and the user's own metadata."""
    metadata = metadata_of(stored)
    headers = {}
    for key, header in _METADATA_HEADERS:
        value = metadata.get(key)
        if value is not None:
            headers[header] = (value if type(value) is str else str(value)).encode()
    if len(metadata) > len(headers):  # more than those: the user's own
        headers[METADATA] = stored.metadata
    return headers


# Metadata riverbed sets, by the header that carries it.
_METADATA_HEADERS = (("correlation_id", CORRELATION), ("causation_id", CAUSATION), (APP_KEY, APP))


def stored_event(record: Record) -> StoredEvent:
    """The event a relayed record carries, for ``riverbed.eventsourcing`` decoding."""
    headers = record.headers
    where = f"record {record.topic}[{record.partition}]@{record.offset}"
    metadata = headers.get(METADATA)
    needed = _EVENT_HEADERS if metadata is not None else (*_EVENT_HEADERS, CORRELATION)
    missing = [name for name in needed if name not in headers]
    if missing:
        raise EventSourcingError(
            f"{where} has no header {', '.join(missing)}: it carries no event, the outbox relay "
            "did not publish it"
        )

    def text(name: str) -> str:
        value = headers[name]
        try:
            return value.decode()
        except (AttributeError, UnicodeDecodeError):  # None (Kafka's null), or not UTF-8
            raise EventSourcingError(
                f"{where} has header {name} {value!r}, not UTF-8 text: the outbox relay did "
                "not publish it as it is"
            ) from None

    def number(name: str) -> int:
        value = text(name)
        if not (value.isascii() and value.isdigit()):
            raise EventSourcingError(
                f"{where} has header {name} {value!r}, not a number: the outbox relay did not "
                "publish it as it is"
            )
        return int(value)

    if metadata is None:
        # In the order a save writes them, so the event is the stored one, byte for byte.
        ids = {APP_KEY: text(APP)} if APP in headers else {}
        ids["correlation_id"] = text(CORRELATION)
        if CAUSATION in headers:
            ids["causation_id"] = text(CAUSATION)
        metadata = msgspec.msgpack.encode(ids)
    return StoredEvent(
        position=number(POSITION),
        id=text(EVENT_ID),
        stream=text(STREAM),
        version=number(STREAM_VERSION),
        type=text(EVENT_TYPE),
        schema=number(EVENT_SCHEMA),
        data=record.value or b"",
        metadata=metadata,
        # A record relayed before the event's time had a header of its own carries it itself.
        timestamp_ms=number(EVENT_TIME) if EVENT_TIME in headers else record.timestamp_ms,
    )


class Inbox:
    """Exactly-once handling of relayed events on the consumer's side: ``handle`` runs ``fn`` in
    a transaction of ``events``' store that also records the event id, and skips an id it has
    seen (the relay repeats at most its last unacknowledged batch)."""

    def __init__(self, events: Events, name: str) -> None:
        """``name``: the inbox's in the store; another app's inbox of that name there is
        refused when this one first handles a record (they would drop each other's events as
        seen)."""
        check_name(name, "Inbox's name")
        self.events = events
        self.name = f"inbox:{name}"
        self._inbox = name
        self._claimed = False  # on first use: making an inbox needs no store

    def handle(self, record: Record, fn: Callable[[StoredEvent, Transaction], object]) -> bool:
        """True if handled now; False if the event was handled before."""
        if not self._claimed:
            claim(self.events.store, self.events.app_name, [f"inbox {self._inbox}"])
            self._claimed = True
        event = stored_event(record)
        # What fn saves is caused by the relayed event, in its correlation.
        correlation = metadata_of(event).get("correlation_id")
        if not isinstance(correlation, str):
            correlation = event.id  # saved without one (riverbed saves one with every event)
        with self.events.store.transaction(self.name) as tx, causing(event.id, correlation):
            if tx.seen(event.id):
                return False
            refuse_awaitable(  # rolled back: not seen, and nothing of it ran
                fn(event, tx),
                "Inbox.handle runs a plain function in the store's transaction: this one is "
                "async, so nothing of it ran; make it a plain function",
            )
            return True
