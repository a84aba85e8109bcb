"""APScheduler 3 on every worker, each job run once per fire: a shared executor.

An app that starts its scheduler in each worker process (gunicorn, uvicorn or
hypercorn with several workers) runs every job in every worker: four workers,
four nightly reports. With this executor each worker still runs its
scheduler, but a fire is claimed in the shared state before it runs, and only
the worker whose claim wins runs it::

    from shared_core.contrib.apscheduler import SharedExecutor

    scheduler = BackgroundScheduler(executors={"default": SharedExecutor()})
    scheduler.add_job(send_report, "cron", hour=3, id="send_report")
    scheduler.start()  # in every worker, as before

``pip install "shared-core[apscheduler]"`` (``APScheduler>=3.10,<4``; 4.x has
another executor interface). The same line fits the other schedulers and
Flask-APScheduler, which passes ``SCHEDULER_EXECUTORS`` to its scheduler::

    AsyncIOScheduler(executors={"default": SharedExecutor()})
    app.config["SCHEDULER_EXECUTORS"] = {"default": SharedExecutor()}  # before init_app
    # or from a config file, by reference (keyword arguments beside "class"):
    {"default": {"class": "shared_core.contrib.apscheduler:SharedExecutor", "prefix": "jobs"}}

The jobs run in the scheduler's own default executor (``inner``, made at
``start``): a thread pool, or for :class:`~apscheduler.schedulers.asyncio.AsyncIOScheduler`
an ``AsyncIOExecutor`` (``async def`` jobs on the event loop); pass
``inner=ProcessPoolExecutor()`` or any other executor to choose. The claims
go to the default state (``$SHARED_STATE_URL``, else the embedded server of
the app ``default``) unless a state is given: ``SharedExecutor(SharedState(app="my_app"))``,
or the app's own, ``SharedExecutor(shared_core.flask.get_state(app))``.

What each worker must do:

- **Give every job an explicit** ``id=``, the same in every worker. Without
  one APScheduler draws a random id per worker; the executor then names the
  job by its name, function, trigger and the ``repr`` of its arguments, which
  is enough for most jobs, but an argument whose ``repr`` differs between
  workers (an object without a ``__repr__``, a time taken at start-up) makes
  each worker's job its own, run in every worker (a warning is logged when a
  ``repr`` shows an address).
- **Schedule each job the same way** in every worker: the same trigger, the
  same interval. A job added without a trigger runs once, at each worker's own
  start: it runs in every worker; give it a date trigger with a fixed ``run_date``.
- **Start the scheduler in each worker**, after the fork (not in gunicorn's
  master with ``--preload``: threads do not survive a fork).
- **Keep the clocks in step** (NTP) when workers on several machines share a
  Redis or a PostgreSQL: each worker decides on its own clock when a fire is due.

What a fire is. Its claim is the key ``PREFIX:JOB:WHEN`` (``prefix``
defaults to ``apscheduler``; ``JOB`` is the job's id, or ``NAME~HASH`` of the
above for a drawn one), added with
:meth:`~shared_core.SharedState.add`, atomic on every engine, holding the
claiming worker's ``{"pid", "host"}``. ``WHEN`` (UTC, to the microsecond):

interval trigger
    The start of the slot of the run time: slots are intervals of the
    trigger's length counted from the epoch. Each worker's trigger starts at
    that worker's own start-up, so their run times differ by milliseconds,
    but each fires once per slot, and the first to fire in the slot runs it:
    usually the same worker every time, until it stops. With a jitter too.
cron trigger
    The run time; with a ``jitter``, the cron time it was drawn from (keep
    the jitter shorter than the time between two fires).
any other trigger
    The run time. A jitter on another trigger (``calendarinterval``, ``and``,
    ``or``) gives each worker its own run times: that job runs in every worker.

A claim expires after ``span + late + 60`` seconds (``ttl=`` sets one for
all): ``span`` is the interval (for cron, the jitter; else 0), ``late`` how
late another worker may still submit the same fire: the job's
``misfire_grace_time`` (later than that APScheduler skips the run as missed
anyway), a day if it is None, at most the interval for a coalescing interval
job (such a worker submits only its latest run time). So a claim outlives
every other worker's chance at its fire, and keys do not pile up: a job every
5 minutes, with APScheduler's defaults, keeps one or two claims of 361 s.

Guarantees and their limits:

- **At most once per fire.** The claim is taken before the job runs: a worker
  that dies mid-job leaves that fire unfinished, and no one runs it again.
- **The state unavailable**: the claim raises, APScheduler logs ``Error
  submitting job`` and the fire is skipped in every worker; the next one is
  claimed as usual. A claim is one round trip, made where APScheduler handles
  due jobs: the scheduler's thread, or the event loop for ``AsyncIOScheduler``
  (as APScheduler's own job stores do); a server that does not answer holds
  it for up to the state's ``connect_timeout`` or ``op_timeout``.
- **max_instances counts per worker**, in the inner executor as in APScheduler.
  A worker still running ``max_instances`` of a job does not claim its next
  fire (APScheduler logs the usual warning there) and leaves it to an idle
  worker, so instances of one job may overlap across workers: for exclusion
  across the deployment, hold a ``state.lock(...)`` in the job.
- **Events**: ``EVENT_JOB_SUBMITTED`` in every worker for every fire;
  ``EVENT_JOB_EXECUTED``, ``_ERROR`` and ``_MISSED`` only in the worker that
  ran it.

APScheduler 3 cannot share one persistent job store between schedulers; each
worker keeps its own (the default memory store) and this executor only
decides who runs a fire.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import socket
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from apscheduler.executors.base import (  # type: ignore[import-untyped]
    BaseExecutor,
    MaxInstancesReachedError,
)
from apscheduler.job import Job  # type: ignore[import-untyped]
from apscheduler.schedulers.base import BaseScheduler  # type: ignore[import-untyped]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from .._errors import StateError
from .._state import SharedState

__all__ = ["DEFAULT_PREFIX", "SharedExecutor"]

DEFAULT_PREFIX = "apscheduler"
# Seconds a claim outlives the last moment another worker may claim its fire:
# for clocks a little apart and schedulers that wake up late.
MARGIN = 60.0
DAY = 86400.0

_AUTO_ID = re.compile(r"[0-9a-f]{32}")  # what Job.__init__ draws: uuid4().hex
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object.__repr__: differs per process
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (datetimes are whole microseconds)."""
    return (moment - _EPOCH) // _MICROSECOND


def _unjittered(trigger: CronTrigger, run_time: datetime) -> datetime:
    """The cron time ``run_time`` was drawn from: the first fire of the trigger
    without its jitter at or after ``run_time - jitter``."""
    plain = copy.copy(trigger)
    plain.jitter = None
    base: datetime | None = plain.get_next_fire_time(
        None, run_time - timedelta(seconds=trigger.jitter)
    )
    return base if base is not None and base <= run_time else run_time


class SharedExecutor(BaseExecutor):  # type: ignore[misc]
    """An APScheduler executor that runs a fire only in the worker that claims
    it in the shared state (see the module docstring).

    Parameters:
        state: the :class:`~shared_core.SharedState` to claim fires in, the
            same for every worker; default ``SharedState()``
            (``$SHARED_STATE_URL``, else ``local://default``).
        inner: the executor that runs the claimed fires; default: the one the
            scheduler makes for itself, at each start (``ThreadPoolExecutor``,
            ``AsyncIOExecutor`` for ``AsyncIOScheduler``, ...).
        prefix: the first part of every claim key (non-empty).
        ttl: seconds a claim is kept; default: computed per job (see
            :meth:`claim_ttl`).
    """

    def __init__(
        self,
        state: SharedState | None = None,
        inner: BaseExecutor | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float | None = None,
    ) -> None:
        super().__init__()
        if state is not None and not isinstance(state, SharedState):
            raise TypeError(
                f"state must be a SharedState, not {type(state).__name__} (claims are made "
                "synchronously, where the scheduler handles its due jobs)"
            )
        if inner is not None and (
            not isinstance(inner, BaseExecutor) or isinstance(inner, SharedExecutor)
        ):
            raise TypeError(
                "inner must be an APScheduler executor (not a SharedExecutor), "
                f"not {type(inner).__name__}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if not prefix:
            raise ValueError("prefix must not be empty")
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
                raise TypeError(f"ttl must be a number of seconds or None, not {ttl!r}")
            if not (ttl > 0 and math.isfinite(ttl)):
                raise ValueError(f"ttl must be a finite number of seconds > 0, not {ttl!r}")
        self.state: SharedState = SharedState() if state is None else state
        self.prefix = prefix
        self.ttl: float | None = None if ttl is None else float(ttl)
        self._given = inner
        #: The executor running this worker's claimed fires (None until started).
        self.inner: BaseExecutor | None = inner
        self._host = socket.gethostname()
        self._warned: set[str] = set()

    # --- the executor interface -----------------------------------------------------

    def start(self, scheduler: BaseScheduler, alias: str) -> None:
        """Start with ``scheduler`` (APScheduler calls this), and the inner executor."""
        super().start(scheduler, alias)
        # Made anew at each start when not given: a pool that was shut down
        # does not start again.
        self.inner = (
            self._given if self._given is not None else scheduler._create_default_executor()
        )
        self.inner.start(scheduler, alias)

    def shutdown(self, wait: bool = True) -> None:
        """Shut the inner executor down (``wait``: until its running jobs end)."""
        if self.inner is not None:
            self.inner.shutdown(wait)

    def submit_job(self, job: Job, run_times: Sequence[datetime]) -> None:
        """Claim each of ``run_times`` and give the inner executor those won.

        Raises APScheduler's ``MaxInstancesReachedError``, without claiming,
        when this worker already runs ``job.max_instances`` of the job;
        :class:`~shared_core.StateError` when the state cannot be reached.
        """
        inner = self.inner
        if inner is None:
            raise RuntimeError("This executor has not been started yet")
        # Checked before claiming: a busy worker that claimed and then was refused
        # by the inner executor would drop the fire for the whole deployment.
        # Only this thread adds instances, so the count cannot rise before the
        # inner executor checks it again.
        with inner._lock:
            if inner._instances.get(job.id, 0) >= job.max_instances:
                raise MaxInstancesReachedError(job)
        claimed = self._claim(job, run_times)
        if claimed:
            # Its own bookkeeping (_instances) counts the run and uncounts it when done.
            inner.submit_job(job, claimed)

    def _do_submit_job(self, job: Job, run_times: Sequence[datetime]) -> None:
        raise NotImplementedError("submit_job hands the claimed runs to the inner executor")

    # --- claims ---------------------------------------------------------------------

    def claim_key(self, job: Job, run_time: datetime) -> str:
        """The state key of the fire of ``job`` at ``run_time``: the same in
        every worker that schedules the job the same way."""
        return f"{self.prefix}:{self._job_name(job)}:{self._when(job, run_time)}"

    def claim_ttl(self, job: Job) -> float:
        """Seconds the claims of ``job`` are kept: ``ttl`` if given, else
        ``span + late + MARGIN`` (see the module docstring)."""
        if self.ttl is not None:
            return self.ttl
        trigger = job.trigger
        if isinstance(trigger, IntervalTrigger):
            span = float(trigger.interval_length)
        elif isinstance(trigger, CronTrigger):
            span = float(trigger.jitter or 0)
        else:
            span = 0.0
        grace = job.misfire_grace_time
        late = DAY if grace is None else min(float(grace), DAY)
        if isinstance(trigger, IntervalTrigger) and job.coalesce:
            late = min(late, span)
        return span + late + MARGIN

    def _claim(self, job: Job, run_times: Sequence[datetime]) -> list[datetime]:
        ttl = self.claim_ttl(job)
        owner = {"pid": os.getpid(), "host": self._host}
        claimed: list[datetime] = []
        for run_time in run_times:
            try:
                won = self.state.add(self.claim_key(job, run_time), owner, ttl)
            except StateError:
                if not claimed:
                    raise
                # Those already claimed are this worker's to run, or no one's.
                self._logger.exception('Claiming the runs of job "%s" failed midway', job)
                break
            if won:
                claimed.append(run_time)
            else:
                self._logger.debug('Job "%s" (%s) runs in another worker', job, run_time)
        return claimed

    def _job_name(self, job: Job) -> str:
        job_id = str(job.id)
        if not _AUTO_ID.fullmatch(job_id):
            return job_id
        # A random id, different in every worker: what the workers share instead.
        func = job.func_ref or f"{getattr(job.func, '__module__', '')}:{job.name}"
        kwargs = sorted(job.kwargs.items())  # keys are unique: values are never compared
        material = f"{job.name}\0{func}\0{job.trigger}\0{tuple(job.args)!r}\0{kwargs!r}"
        if _ADDRESS.search(material):
            self._warn_once(
                job,
                'Job "%s" has no id and an argument whose repr differs between workers: '
                "each worker's job is its own and runs; give it an id",
            )
        return f"{job.name}~{hashlib.sha256(material.encode()).hexdigest()[:16]}"

    def _when(self, job: Job, run_time: datetime) -> str:
        trigger = job.trigger
        if isinstance(trigger, IntervalTrigger):
            # Integer microseconds: every fire of a worker lands in the next slot
            # exactly, never twice in one because of a rounding.
            length = trigger.interval // _MICROSECOND
            micros = _micros(run_time)
            micros -= micros % length
        elif isinstance(trigger, CronTrigger) and trigger.jitter:
            micros = _micros(_unjittered(trigger, run_time))
        else:
            if getattr(trigger, "jitter", None):
                self._warn_once(
                    job,
                    'Job "%s": a jitter on this trigger gives each worker its own run '
                    "times: it runs in every worker",
                )
            micros = _micros(run_time)
        moment = _EPOCH + timedelta(microseconds=micros)
        return moment.isoformat().replace("+00:00", "Z")

    def _warn_once(self, job: Job, message: str) -> None:
        if job.id not in self._warned:
            self._warned.add(job.id)
            self._logger.warning(message, job)

    def __repr__(self) -> str:
        return f"SharedExecutor({self.state.url!r}, inner={self.inner!r}, prefix={self.prefix!r})"
