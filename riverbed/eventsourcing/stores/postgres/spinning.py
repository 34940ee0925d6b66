"""How the sync store's appends wait for the server's answer: a short spin, then sleep.

An append is one round trip. From a server close by (the same host, the same rack) the answer
comes back within a tenth of a millisecond, but a process asleep in ``poll`` learns of it only
once the kernel has woken its CPU, and on a virtual machine waking a sleeping CPU costs about as
much again: a save per command took 110 us here, about 80 us when the client polled without
sleeping (bench/README.md, "PostgreSQL appends spin"). So an append first polls without
blocking, for up to ``spin_us`` microseconds (the URL's option, 200 by default), and sleeps only
if the answer has not come by then. Between two polls the spinning thread yields its CPU
(``sched_yield``), with the GIL released: a thread of the process waiting for the GIL takes it
then, where otherwise the spinner would take it back after each poll and make it wait the
interpreter's switch interval (5 ms).

The spin costs the CPU it runs on. It is skipped when it cannot pay: while answers have lately
taken longer than the spin (a remote or busy server: a running average of their times, each
counted as at most twice the spin, so that one slow answer, say a wait for a lock, does not stop
the spin for the fast ones after it), in a process allowed a single CPU, where the spin would
hold the CPU a server on the same machine needs to answer, and while another thread of the
process spins: appends from several threads wait for each other on the server anyway, and two
spinners would take both CPUs of a small machine from the server (four threads saving through
one store were a tenth slower so; with one spinner at a time, yielding, as fast as without a
spin).
"""

from __future__ import annotations

import os
import select
import threading
import time

SPIN_US = 200
MAX_SPIN_US = 10_000
# Each answer's weight in the running average of their times.
_WEIGHT = 0.125
# Held by the thread spinning, if one is.
_spinning = threading.Lock()


def _no_spinner() -> None:
    """In a child forked while a thread spun: the child does not have that thread."""
    if _spinning.locked():
        _spinning.release()


os.register_at_fork(after_in_child=_no_spinner)


def usable_cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class AnswerWait:
    """Waits for a connection's socket to have the server's answer; one per store."""

    __slots__ = ("spin_s", "typical_s")

    def __init__(self, spin_us: int, cpus: int | None = None) -> None:
        cpus = usable_cpus() if cpus is None else cpus
        self.spin_s = spin_us / 1_000_000 if cpus > 1 else 0.0
        self.typical_s = 0.0  # how long answers took lately

    def wait(self, poller: select.poll) -> None:
        """Until ``poller`` reports its socket readable."""
        started = time.perf_counter()
        if self.spin_s and self.typical_s <= self.spin_s and _spinning.acquire(blocking=False):
            try:
                until = started + self.spin_s
                while not poller.poll(0):
                    os.sched_yield()
                    if time.perf_counter() >= until:
                        poller.poll()
                        break
            finally:
                _spinning.release()
        else:
            poller.poll()
        took = min(time.perf_counter() - started, 2 * self.spin_s)
        self.typical_s += (took - self.typical_s) * _WEIGHT
