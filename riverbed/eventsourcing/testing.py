"""Given/when/then for aggregates, in users' unit tests (no store needed).

scenario(Order).given(Order.Placed(...)).when(lambda o: o.pay("r1")).then(Order.Paid(...))
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from riverbed.eventsourcing.aggregate import Aggregate
from riverbed.eventsourcing.codec import ENCODER, registry
from riverbed.eventsourcing.errors import refuse_awaitable

A = TypeVar("A", bound=Aggregate)


class Scenario(Generic[A]):
    def __init__(self, cls: type[A], aggregate_id: str = "test-aggregate") -> None:
        self.cls = cls
        self.aggregate: A = cls.__new__(cls)
        self.aggregate._begin(aggregate_id)
        self.error: BaseException | None = None

    def given(self, *events: Any) -> Scenario[A]:
        """Events that already happened to the aggregate (applied, not recorded)."""
        for event in events:
            entry = registry.of(event)
            if not entry.recorded_by(self.cls):  # a store would refuse this history too
                raise AssertionError(
                    f"{entry.name} is an event of another aggregate class, not of "
                    f"{self.cls.__name__}"
                )
            # A copy, as a load would decode it: the test's own object stays as it was.
            try:
                loaded = entry.decoder.decode(ENCODER.encode(event))
            except (msgspec.MsgspecError, NotImplementedError, TypeError, ValueError) as error:
                raise AssertionError(f"{entry.name} would not load back: {error}") from None
            self.aggregate._replay(loaded, entry, self.aggregate.version + 1)
        return self

    def when(self, command: Callable[[A], object]) -> Scenario[A]:
        """Run a command on the aggregate; an exception it raises is kept for ``then_raises``."""
        try:
            result = command(self.aggregate)
        except Exception as error:
            self.error = error
            return self
        refuse_awaitable(
            result,
            "when() runs a plain command: this one is async, so nothing of it ran; run its "
            "aggregate methods from a plain function",
        )
        return self

    def then(self, *expected: Any) -> A:
        """The command recorded exactly these events, in order; returns the aggregate."""
        if self.error is not None:
            raise AssertionError(f"the command raised {self.error!r}") from self.error
        recorded = [entry.event for entry in self.aggregate.pending]
        if recorded != list(expected):
            raise AssertionError(f"expected events {list(expected)!r}, recorded {recorded!r}")
        return self.aggregate

    def then_raises(self, error: type[BaseException], match: str = "") -> BaseException:
        """The command raised ``error``, whose message ``match`` (a regular expression, as
        for ``pytest.raises``) is found in, and recorded nothing; returns the error."""
        if self.error is None:
            recorded = [entry.event for entry in self.aggregate.pending]
            raise AssertionError(
                f"expected {error.__name__} matching {match!r}, but the command raised nothing "
                f"and recorded {recorded!r}"
            )
        if not isinstance(self.error, error) or not re.search(match, str(self.error)):
            raise AssertionError(
                f"expected {error.__name__} matching {match!r}, got {self.error!r}"
            ) from self.error
        if self.aggregate.pending:
            recorded = [entry.event for entry in self.aggregate.pending]
            raise AssertionError(f"a refused command recorded {recorded!r}")
        return self.error


def scenario(cls: type[A], aggregate_id: str = "test-aggregate") -> Scenario[A]:
    return Scenario(cls, aggregate_id)
