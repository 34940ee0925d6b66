"""``Tasks``: an app's task registry and its broker connection (``app.tasks``)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, overload

from riverbed.backoff import Backoff
from riverbed.errors import RiverbedError
from riverbed.tasks.brokers import Broker, connect_broker
from riverbed.tasks.messages import DEFAULT_QUEUE, MIN_PRIORITY
from riverbed.tasks.schedules import Schedule
from riverbed.tasks.task import RateLimit, Task, TaskOptions

if TYPE_CHECKING:
    from riverbed.tasks.worker.worker import Pool, Worker

P = ParamSpec("P")
R = TypeVar("R")


class TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...


@dataclass(frozen=True)
class Periodic:
    """A task the leading worker enqueues on a schedule."""

    task: Task[[], Any]
    schedule: Schedule


class Tasks:
    """The tasks of one app, on the broker at ``url`` (else ``$RIVERBED_TASKS_URL``, else
    ``sqlite:///.riverbed/tasks.db``), connected on first use."""

    def __init__(self, app_name: str, url: str | None = None) -> None:
        self.app_name = app_name
        self._url = url
        self._broker: Broker | None = None
        self._connecting = threading.Lock()  # a worker's threads may connect at once
        self.registry: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Periodic] = {}

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._connecting:
                if self._broker is None:
                    self._broker = connect_broker(self._url)
        return self._broker

    def use_url(self, url: str | None) -> None:
        """Point the not yet connected tasks at another broker (tests do)."""
        if self._broker is not None:
            raise RiverbedError(f"the tasks of app '{self.app_name}' are connected; close() first")
        self._url = url

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff: Backoff | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = MIN_PRIORITY,
        rate_limit: str | None = None,
    ) -> TaskDecorator: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int = 0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        backoff: Backoff | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = MIN_PRIORITY,
        rate_limit: str | None = None,
    ) -> Any:
        """Register ``fn`` (``def`` or ``async def``) as a task.

        ``retries`` failures raising one of ``retry_on`` are retried after ``backoff`` delays,
        then the task goes to the dead-letter queue. ``timeout``: hard limit in seconds (the
        process running it is killed and replaced); ``soft_timeout``: ``SoftTimeLimitExceeded``
        is raised inside it. ``queue``/``priority`` (0-9, higher first) route it; ``rate_limit``
        ("100/s", "30/m") holds it across all workers."""
        options = TaskOptions(
            retries=retries,
            retry_on=retry_on,
            backoff=backoff or Backoff(),
            timeout=timeout,
            soft_timeout=soft_timeout,
            queue=queue,
            priority=priority,
            rate_limit=RateLimit.parse(rate_limit) if rate_limit else None,
        )

        def register(function: Callable[..., Any]) -> Task[Any, Any]:
            task_name = name or default_name(function)
            if task_name in self.registry:
                raise RiverbedError(
                    f"a task named {task_name!r} is already registered on app "
                    f"'{self.app_name}'; pass name= to tell them apart"
                )
            task: Task[Any, Any] = Task(self, function, task_name, options)
            self.registry[task_name] = task
            return task

        return register(fn) if fn is not None else register

    def periodic(
        self,
        *,
        every: float | timedelta | None = None,
        cron: str | None = None,
        name: str | None = None,
        **options: Any,
    ) -> Callable[[Callable[[], Any]], Task[[], Any]]:
        """Register a no-argument task that workers run ``every`` seconds or per a ``cron``
        expression (UTC), exactly once per tick however many workers run."""
        schedule = Schedule.of(every, cron)

        def register(fn: Callable[[], Any]) -> Task[[], Any]:
            task: Task[[], Any] = self.task(name=name, **options)(fn)
            self.schedules[task.name] = Periodic(task, schedule)
            return task

        return register

    def get(self, name: str) -> Task[Any, Any] | None:
        return self.registry.get(name)

    def worker(
        self,
        *,
        concurrency: int | None = None,
        pool: Pool = "thread",
        queues: list[str] | None = None,
        lease: float = 30.0,
        shutdown_timeout: float = 30.0,
        prefetch: int | None = None,
    ) -> Worker:
        """A worker for these tasks; ``run()`` it (``riverbed tasks worker`` does)."""
        from riverbed.tasks.worker.worker import Worker

        return Worker(
            self,
            concurrency=concurrency,
            pool=pool,
            queues=queues,
            lease=lease,
            shutdown_timeout=shutdown_timeout,
            prefetch=prefetch,
        )

    def close(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None


def default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``; a script run as ``__main__`` is named by its file, as a worker that
    imports it by that name would see it."""
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        module = Path(main_file).stem if main_file else module
    return f"{module}.{fn.__qualname__}"
