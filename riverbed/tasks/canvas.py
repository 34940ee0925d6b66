"""Canvas: ``chain``, ``group`` and ``chord``, driven by the broker, never by polling.

Every task id is assigned up front. A chain's first message carries the later steps; the worker
that finishes a step enqueues the next (with the result prepended to its arguments) in the same
broker transaction that stores the result. A chord's callback waits in the broker beside a
countdown of its headers; the finish of the last header enqueues it, and the worker running it
prepends the list of header results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from riverbed.errors import RiverbedError
from riverbed.tasks.handle import GroupHandle, TaskHandle
from riverbed.tasks.messages import ChordSpec, TaskMessage, new_task_id

if TYPE_CHECKING:
    from riverbed.tasks.task import CallOptions, Task

R = TypeVar("R")


@dataclass(frozen=True)
class Signature(Generic[R]):
    """A task with leading arguments and call options: ``task.s(1, 2)``."""

    task: Task[..., R]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    call: CallOptions

    def message(self, task_id: str | None = None, *, partial: bool = False) -> TaskMessage:
        return self.task.message(self.args, self.kwargs, self.call, task_id, bind=not partial)

    def delay(self) -> TaskHandle[R]:
        (task_id,) = self.task._tasks.broker.enqueue([self.message()])
        return self.task.handles([task_id])[0]


def chain(first: Signature[Any], *rest: Signature[Any]) -> Chain[Any]:
    """Run tasks one after another, each getting the previous result as its first argument."""
    _no_keys((first, *rest), "a chain's steps")
    return Chain((first, *rest))


def _no_keys(signatures: Sequence[Signature[Any]], what: str) -> None:
    """A step stands for others (the steps after it, a chord's callback): an idempotency key
    that let the broker keep an earlier task in its place would leave them waiting for ever."""
    keyed = next((s for s in signatures if s.call.key), None)
    if keyed is not None:
        raise RiverbedError(
            f"{what} take no idempotency key (task {keyed.task.name} has key "
            f"{keyed.call.key!r}): the broker would keep an earlier task of that key in its "
            "place, and what follows it would wait for ever; enqueue that task on its own"
        )


def group(*signatures: Signature[R]) -> Group[R]:
    """Run tasks in parallel, enqueued together in one broker call."""
    if not signatures:
        raise RiverbedError("a group needs at least one signature")
    return Group(signatures)


def chord(header: Group[Any] | Sequence[Signature[Any]], callback: Signature[R]) -> Chord[R]:
    """Run ``header`` in parallel, then ``callback`` with the list of their results first."""
    members = header.signatures if isinstance(header, Group) else tuple(header)
    if not members:
        raise RiverbedError("a chord needs at least one header signature")
    _no_keys((*members, callback), "a chord's header and callback")
    return Chord(members, callback)


@dataclass(frozen=True)
class Chain(Generic[R]):
    steps: tuple[Signature[Any], ...]

    def delay(self) -> TaskHandle[R]:
        """Enqueue the first step; the handle is the last step's."""
        first, *rest = self.steps
        later = tuple(_later_step(step) for step in rest)
        head = msgspec.structs.replace(first.message(), link=later)
        broker = first.task._tasks.broker
        broker.enqueue([head])
        last = self.steps[-1]
        if not later:
            return last.task.handles([head.id])[0]
        before = (head.id, *(step.id for step in later[:-1]))
        return last.task.later_handle(later[-1].id, steps_before=before)


def _later_step(step: Signature[Any]) -> TaskMessage:
    """A chain's later step, whose countdown and expiry in seconds count from when it is
    enqueued (the step before it succeeded), not from now; an eta or expiry datetime stays."""
    message = step.message(partial=True)
    countdown, expires = step.call.countdown, step.call.expires
    if countdown is not None:
        message = msgspec.structs.replace(message, eta_ms=0, countdown_ms=int(countdown * 1000))
    if isinstance(expires, int | float):
        message = msgspec.structs.replace(
            message, expires_ms=0, expires_after_ms=int(expires * 1000)
        )
    return message


@dataclass(frozen=True)
class Group(Generic[R]):
    signatures: tuple[Signature[R], ...]

    def delay(self) -> GroupHandle[R]:
        messages = [signature.message() for signature in self.signatures]
        broker = self.signatures[0].task._tasks.broker
        ids = broker.enqueue(messages)
        return GroupHandle(
            [
                sig.task.handles([task_id])[0]
                for sig, task_id in zip(self.signatures, ids, strict=True)
            ]
        )


@dataclass(frozen=True)
class Chord(Generic[R]):
    header: tuple[Signature[Any], ...]
    callback: Signature[R]

    def delay(self) -> TaskHandle[R]:
        chord_id = new_task_id()
        headers = [
            msgspec.structs.replace(signature.message(), chord=chord_id)
            for signature in self.header
        ]
        callback = msgspec.structs.replace(
            self.callback.message(partial=True), gather=tuple(m.id for m in headers)
        )
        broker = self.callback.task._tasks.broker
        broker.enqueue(headers, ChordSpec(chord_id, len(headers), callback))
        return self.callback.task.later_handle(callback.id, headers=callback.gather)
