"""``@app.task``: a function that runs on a worker, called with ``delay``."""

from __future__ import annotations

import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from riverbed.backoff import Backoff
from riverbed.tasks.calls import CallCodec
from riverbed.tasks.handle import TaskHandle
from riverbed.tasks.messages import (
    DEFAULT_QUEUE,
    MAX_PRIORITY,
    MIN_PRIORITY,
    TaskMessage,
    new_task_id,
    now_ms,
)

if TYPE_CHECKING:
    from riverbed.tasks.canvas import Signature
    from riverbed.tasks.registry import Tasks

P = ParamSpec("P")
R = TypeVar("R")

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


@dataclass(frozen=True)
class RateLimit:
    """``"100/s"``, ``"30/m"``, ``"5/h"``: a token bucket held in the broker, shared by all
    workers, refilled at ``per_second`` and holding one tenth of a second's worth (at least one
    token), so tasks are spread out rather than let through in bursts."""

    text: str
    per_second: float

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_second / 10)

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = _RATE.match(text)
        if match is None or float(match[1]) <= 0:
            raise ValueError(f"rate_limit {text!r}: write a positive rate like '100/s', '30/m'")
        return cls(text, float(match[1]) / _PER[match[2]])


@dataclass(frozen=True)
class TaskOptions:
    """How a task runs: retries, time limits, routing, rate limit."""

    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: Backoff = field(default_factory=Backoff)
    timeout: float | None = None
    soft_timeout: float | None = None
    queue: str = DEFAULT_QUEUE
    priority: int = MIN_PRIORITY
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        for name in ("timeout", "soft_timeout"):
            limit = getattr(self, name)
            if limit is not None and limit <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {limit}")
        if self.timeout and self.soft_timeout and self.soft_timeout >= self.timeout:
            raise ValueError(
                f"soft_timeout ({self.soft_timeout} s) must be below timeout ({self.timeout} s)"
            )
        check_routing(self.queue, self.priority)


def check_routing(queue: str, priority: int) -> None:
    if not _QUEUE_NAME.match(queue):
        raise ValueError(f"queue name {queue!r}: use 1-200 letters, digits, '.', '_' or '-'")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(
            f"priority {priority}: use {MIN_PRIORITY} (lowest, the default) to {MAX_PRIORITY}"
        )


@dataclass(frozen=True)
class CallOptions:
    """Per-call overrides from ``task.options(...)``."""

    countdown: float | None = None
    eta: datetime | None = None
    priority: int | None = None
    queue: str | None = None
    key: str | None = None
    expires: float | datetime | None = None

    def eta_ms(self) -> int:
        if self.countdown is not None and self.eta is not None:
            raise ValueError("give countdown= or eta=, not both")
        if self.countdown is not None:
            if self.countdown < 0:
                raise ValueError(f"countdown must be >= 0 seconds, got {self.countdown}")
            return now_ms() + int(self.countdown * 1000)
        if self.eta is not None:
            return _epoch_ms(self.eta, "eta")
        return 0

    def expires_ms(self) -> int:
        if self.expires is None:
            return 0
        if isinstance(self.expires, datetime):
            return _epoch_ms(self.expires, "expires")
        if self.expires <= 0:
            raise ValueError(f"expires must be a positive number of seconds, got {self.expires}")
        return now_ms() + int(self.expires * 1000)


def _epoch_ms(moment: datetime, what: str) -> int:
    if moment.tzinfo is None:
        raise ValueError(
            f"{what}={moment.isoformat()} has no time zone; pass an aware datetime, "
            "e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    return int(moment.timestamp() * 1000)


class Task(Generic[P, R]):
    """A registered task. Call it to run it here; ``delay`` to run it on a worker."""

    def __init__(
        self,
        tasks: Tasks,
        fn: Callable[P, R] | Callable[P, Awaitable[R]],
        name: str,
        options: TaskOptions,
    ) -> None:
        self._tasks = tasks
        self.fn = fn
        self.name = name
        self.settings = options
        self.is_async = inspect.iscoroutinefunction(fn)
        self.codec = CallCodec(name, fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function in this process, now (``async def`` tasks: to completion)."""
        result = self.fn(*args, **kwargs)
        if inspect.isawaitable(result):
            finished: R = asyncio.run(_awaited(result))
            return finished
        return result

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        """Enqueue a call; returns at once with its handle."""
        return self._send(args, kwargs, CallOptions())

    async def delay_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        return await asyncio.to_thread(self._send, args, kwargs, CallOptions())

    def delay_many(
        self, calls: Iterable[tuple[Sequence[Any], dict[str, Any]]]
    ) -> list[TaskHandle[R]]:
        """Enqueue many ``(args, kwargs)`` calls in one broker round trip."""
        messages = [self.message(args, kwargs, CallOptions()) for args, kwargs in calls]
        return self.handles(self._tasks.broker.enqueue(messages))

    def options(
        self,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        key: str | None = None,
        expires: float | timedelta | datetime | None = None,
    ) -> BoundTask[P, R]:
        """Per-call overrides: ``countdown`` seconds or ``eta`` (aware datetime) to run later;
        ``priority`` and ``queue``; ``key``: an idempotency key (a second call with the same key
        while the first's result is kept returns the first handle); ``expires``: seconds or a
        datetime after which the task is not started."""
        if isinstance(expires, timedelta):
            expires = expires.total_seconds()
        return BoundTask(self, CallOptions(countdown, eta, priority, queue, key, expires))

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        """A signature for ``chain``, ``group`` and ``chord``: this task with (leading) args."""
        from riverbed.tasks.canvas import Signature

        return Signature(self, args, kwargs, CallOptions())

    def message(
        self,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        call: CallOptions,
        task_id: str | None = None,
        *,
        bind: bool = True,
    ) -> TaskMessage:
        """The message for one call. ``bind=False`` skips the signature check, for a chain's
        later steps and chord callbacks, whose first argument comes from earlier results."""
        queue = call.queue or self.settings.queue
        priority = self.settings.priority if call.priority is None else call.priority
        check_routing(queue, priority)
        payload = self.codec.encode(args, kwargs, partial=not bind)
        return TaskMessage(
            id=task_id or new_task_id(),
            name=self.name,
            payload=payload,
            queue=queue,
            priority=priority,
            eta_ms=call.eta_ms(),
            expires_ms=call.expires_ms(),
            key=call.key or "",
            enqueued_ms=now_ms(),
        )

    def handles(self, ids: list[str]) -> list[TaskHandle[R]]:
        broker = self._tasks.broker
        return [TaskHandle(broker, self.codec, task_id) for task_id in ids]

    def later_handle(
        self, task_id: str, *, steps_before: tuple[str, ...] = (), headers: tuple[str, ...] = ()
    ) -> TaskHandle[R]:
        """The handle of a chain's last step (after ``steps_before``) or of a chord's callback
        (of ``headers``), which the broker knows only once its turn comes."""
        broker = self._tasks.broker
        return TaskHandle(
            broker, self.codec, task_id, enqueued_later=True, steps_before=steps_before,
            headers=headers,
        )  # fmt: skip

    def _send(
        self, args: Sequence[Any], kwargs: dict[str, Any], call: CallOptions
    ) -> TaskHandle[R]:
        message = self.message(args, kwargs, call)
        broker = self._tasks.broker
        (task_id,) = broker.enqueue([message])
        return TaskHandle(broker, self.codec, task_id)


class BoundTask(Generic[P, R]):
    """A task with per-call options: ``task.options(countdown=5).delay(...)``."""

    def __init__(self, task: Task[P, R], call: CallOptions) -> None:
        self.task = task
        self.call = call

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        return self.task._send(args, kwargs, self.call)

    async def delay_async(self, *args: P.args, **kwargs: P.kwargs) -> TaskHandle[R]:
        return await asyncio.to_thread(self.task._send, args, kwargs, self.call)

    def s(self, *args: Any, **kwargs: Any) -> Signature[R]:
        from riverbed.tasks.canvas import Signature

        return Signature(self.task, args, kwargs, self.call)

    def options(self, **overrides: Any) -> BoundTask[P, R]:
        return BoundTask(self.task, replace(self.call, **overrides))


async def _awaited(awaitable: Awaitable[R]) -> R:
    return await awaitable
