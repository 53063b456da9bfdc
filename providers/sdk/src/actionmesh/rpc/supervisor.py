"""Supervised background work: every loop a service runs, owned by one supervisor.

A service's background loops (the gateway's audit shipper and provider watch, the
registry's health checks, a provider's lease renewal...) must never end silently
while the service keeps answering. Each runs as a :class:`SupervisedLoop` under a
:class:`Supervisor`:

- an exception ends the current run, not the loop: it is logged with its traceback,
  counted (``actionmesh.background.loop_failures``, by loop) and the loop starts
  again after a backoff (exponential with jitter, capped);
- a loop failing ``unhealthy_after`` times in a row turns the service's health
  NOT_SERVING (the log line says which loop and why), so an orchestrator can replace
  the process; it keeps being restarted meanwhile, and the first run that makes
  progress again turns health back to SERVING;
- progress is a periodic job that completed, or a continuous loop that calls
  :meth:`SupervisedLoop.progress` (or simply ran ``settle_s`` without failing).

The supervisor is created before the server (loops may have to run before it
serves) and :meth:`Supervisor.attach` connects it to the server's health once there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from opentelemetry import metrics

log = logging.getLogger(__name__)
_meter = metrics.get_meter("actionmesh.rpc")
LOOP_FAILURES = _meter.create_counter(
    "actionmesh.background.loop_failures",
    description="Runs of a supervised background loop that ended with an exception",
)
LOOP_RESTARTS = _meter.create_counter(
    "actionmesh.background.loop_restarts",
    description="Restarts of a supervised background loop after a failure",
)


class LoopState(enum.Enum):
    """Where one supervised loop stands."""

    RUNNING = "running"
    BACKING_OFF = "backing_off"
    FAILING = "failing"
    """Failed ``unhealthy_after`` times in a row: the service reports NOT_SERVING."""
    STOPPED = "stopped"


@dataclass(frozen=True)
class LoopPolicy:
    """How a supervisor restarts a loop and when it gives up on the service's health."""

    initial_backoff_s: float = 0.1
    """First wait before a failed loop runs again; doubles with each failure in a row."""
    max_backoff_s: float = 10.0
    """Longest wait between two runs of a failing loop."""
    unhealthy_after: int = 5
    """Failures in a row after which the service reports NOT_SERVING."""
    settle_s: float = 5.0
    """A continuous loop that runs this long without failing has recovered."""

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("backoffs must be positive, the maximum not below the first")
        if self.unhealthy_after < 1 or self.settle_s <= 0:
            raise ValueError("unhealthy_after must be at least 1 and settle_s positive")

    def backoff(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (jittered, capped)."""
        delay = min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, failures - 1))
        return delay * random.uniform(0.5, 1.0)


class HealthSink(Protocol):
    """What a supervisor reports to: the server's health (``RunningServer``)."""

    async def set_serving(self, serving: bool) -> None: ...


class SupervisedLoop:
    """One background loop: its task, its failures, its state."""

    def __init__(
        self,
        supervisor: Supervisor,
        name: str,
        run: Callable[[SupervisedLoop], Awaitable[None]],
        policy: LoopPolicy,
    ) -> None:
        self.name = name
        self.policy = policy
        self.state = LoopState.RUNNING
        self.failures_in_a_row = 0
        self.failures = 0
        self.last_error = ""
        self._supervisor = supervisor
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.state is not LoopState.FAILING

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervised:{self.name}")

    def progress(self) -> None:
        """The loop did useful work: failures so far are behind it."""
        if self.failures_in_a_row == 0 and self.state is LoopState.RUNNING:
            return
        if self.state is LoopState.FAILING:
            log.warning("background loop %s recovered", self.name)
        self.failures_in_a_row = 0
        self.state = LoopState.RUNNING
        self._supervisor.changed()

    async def join(self) -> None:
        """Wait until the loop has returned (or was stopped)."""
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def stop(self) -> None:
        """Cancel the loop for good (no restart)."""
        self.state = LoopState.STOPPED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _supervise(self) -> None:
        while self.state is not LoopState.STOPPED:
            settled = asyncio.get_running_loop().call_later(self.policy.settle_s, self.progress)
            try:
                await self._run(self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
            else:
                # A loop that returns is done (a fixed key needs no refreshing, say).
                self.progress()
                self.state = LoopState.STOPPED
                return
            finally:
                settled.cancel()
            self.state = (
                LoopState.FAILING
                if self.failures_in_a_row >= self.policy.unhealthy_after
                else LoopState.BACKING_OFF
            )
            self._supervisor.changed()
            await asyncio.sleep(self.policy.backoff(self.failures_in_a_row))
            if self.state is LoopState.BACKING_OFF:
                self.state = LoopState.RUNNING
            LOOP_RESTARTS.add(1, {"loop": self.name})

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.failures_in_a_row += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        LOOP_FAILURES.add(1, {"loop": self.name})
        log.error(
            "background loop %s failed (%d in a row); restarting it",
            self.name,
            self.failures_in_a_row,
            exc_info=exc,
        )
        if self.failures_in_a_row == self.policy.unhealthy_after:
            log.error(
                "background loop %s keeps failing (%s): health is NOT_SERVING until it recovers",
                self.name,
                self.last_error,
            )


class Supervisor:
    """Owns a service's background loops and reports their health to the server."""

    def __init__(self, name: str, policy: LoopPolicy | None = None) -> None:
        self.name = name
        self.policy = policy or LoopPolicy()
        self.loops: dict[str, SupervisedLoop] = {}
        self._health: HealthSink | None = None
        self._reported: bool | None = None
        self._report_lock = asyncio.Lock()
        self._reports: set[asyncio.Task[None]] = set()

    def spawn(
        self,
        name: str,
        run: Callable[[SupervisedLoop], Awaitable[None]],
        *,
        policy: LoopPolicy | None = None,
    ) -> SupervisedLoop:
        """Start a continuous loop: ``run(loop)`` runs until cancelled, calling
        ``loop.progress()`` when it did useful work (optional: ``settle_s`` of running
        without failing counts as progress too)."""
        if name in self.loops and self.loops[name].state is not LoopState.STOPPED:
            raise ValueError(f"a loop named {name!r} is already running")
        loop = SupervisedLoop(self, name, run, policy or self.policy)
        self.loops[name] = loop
        loop.start()
        return loop

    def every(
        self,
        name: str,
        interval_s: float,
        job: Callable[[], Awaitable[object]],
        *,
        first_after_s: float | None = None,
        policy: LoopPolicy | None = None,
    ) -> SupervisedLoop:
        """Run ``job`` every ``interval_s`` (fixed rate); a job that raises is retried
        after the backoff instead of a whole interval later."""
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")

        async def periodic(loop: SupervisedLoop) -> None:
            clock = asyncio.get_running_loop()
            wait = interval_s if first_after_s is None else first_after_s
            if loop.failures_in_a_row:
                wait = 0.0  # the backoff was the wait
            while True:
                await asyncio.sleep(wait)
                started = clock.time()
                await job()
                loop.progress()
                wait = max(0.0, started + interval_s - clock.time())

        return self.spawn(name, periodic, policy=policy)

    @property
    def healthy(self) -> bool:
        return all(loop.healthy for loop in self.loops.values())

    def status(self) -> dict[str, dict[str, object]]:
        """Each loop's state, failure counts and last error (for diagnostics)."""
        return {
            name: {
                "state": loop.state.value,
                "failures_in_a_row": loop.failures_in_a_row,
                "failures": loop.failures,
                "last_error": loop.last_error,
            }
            for name, loop in self.loops.items()
        }

    async def attach(self, health: HealthSink) -> None:
        """Report to ``health`` from now on (the current verdict at once)."""
        self._health = health
        await self._report()

    def changed(self) -> None:
        if self._health is None:
            return
        task = asyncio.get_running_loop().create_task(self._report())
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self) -> None:
        async with self._report_lock:
            healthy = self.healthy
            if self._health is None or healthy == self._reported:
                return
            before, self._reported = self._reported, healthy
            if not healthy:
                failing = [n for n, loop in self.loops.items() if not loop.healthy]
                log.error("%s reports NOT_SERVING: failing loop(s) %s", self.name, failing)
            elif before is not None:
                log.warning("%s: background loops healthy again; SERVING", self.name)
            await self._health.set_serving(healthy)

    async def stop(self) -> None:
        """Stop every loop (in the reverse order they started)."""
        for loop in reversed(list(self.loops.values())):
            await loop.stop()
        for task in list(self._reports):
            task.cancel()
