"""A Python Celery app for Celerity's interop tests (celerity/tests/interop/).

It defines the same task names as Celerity's built-in demo set (worker/src/demo.rs) with the same
behaviour, plus a few test-only tasks that the Rust test registers under the same names on its side.
Everything about where it connects comes from the environment, so `celery -A interop_app worker`,
`celery -A interop_app call` and the driver script all see the same configuration:

  INTEROP_BROKER   broker URL (redis://… or amqp://…)
  INTEROP_BACKEND  result backend URL (redis://… or db+postgresql://…)
  INTEROP_PG_SCHEMA  with a db+postgresql:// backend: the schema of Celery's result tables
  INTEROP_PREFIX   kombu/Celery global_keyprefix for the Redis broker and the Redis result backend
                   (also the prefix of the keys the recording tasks write)
  INTEROP_QUEUE    the default queue (where send_task/delay/celery call put jobs)
  INTEROP_VT       Redis visibility_timeout in seconds (optional; also makes kombu's restore sweep
                   run every second)
"""

import os
import time

import redis
from celery import Celery

BROKER = os.environ["INTEROP_BROKER"]
BACKEND = os.environ["INTEROP_BACKEND"]
PREFIX = os.environ.get("INTEROP_PREFIX", "")
QUEUE = os.environ["INTEROP_QUEUE"]

app = Celery("interop_app", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
if BROKER.startswith("redis"):
    options = {"global_keyprefix": PREFIX}
    if os.environ.get("INTEROP_VT"):
        options["visibility_timeout"] = float(os.environ["INTEROP_VT"])
        # kombu sweeps for expired unacked messages every interval x throttle seconds (10 x 10 by
        # default): make it every second, so a killed worker's job comes back within the test.
        options["unacked_restore_interval"] = 1
        options["unacked_restore_throttle"] = 1
    app.conf.broker_transport_options = options
if BACKEND.startswith("db+"):
    schema = os.environ["INTEROP_PG_SCHEMA"]
    app.conf.database_table_schemas = {"task": schema, "group": schema}
if PREFIX and BACKEND.startswith("redis"):
    app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}

_redis = None


def record_store():
    """The Redis (results' server) the recording tasks write to, under the test's prefix."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(BACKEND if BACKEND.startswith("redis") else BROKER)
    return _redis


class FlakyError(Exception):
    """What demo.flaky raises on the runs it is told to fail (retried automatically)."""


class HandOff(Exception):
    """Raised by the Rust side of interop.handoff; never raised here."""


def _arith(x, y, op):
    if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
        raise TypeError(f"unsupported operand types: {x!r} and {y!r}")
    return op(x, y)


@app.task(name="demo.add")
def add(x, y):
    return _arith(x, y, lambda a, b: a + b)


@app.task(name="demo.mul")
def mul(x, y):
    return _arith(x, y, lambda a, b: a * b)


@app.task(name="demo.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="demo.noop")
def noop(*args, **kwargs):
    return None


@app.task(name="demo.sleep_ms")
def sleep_ms(ms):
    time.sleep(ms / 1000.0)
    return ms


@app.task(name="demo.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="demo.flaky", bind=True, max_retries=10)
def flaky(self, key, failures):
    # Fails on the first `failures` runs of this job (counted by its retries), then succeeds;
    # retried explicitly with self.retry, as a hand-written Celery task would.
    if self.request.retries < failures:
        raise self.retry(
            exc=FlakyError(f"{key}: failing run {self.request.retries + 1} of {failures}"),
            countdown=0.1,
        )
    return {"key": key, "runs": self.request.retries + 1}


@app.task(name="interop.record")
def record(n, ms=2):
    """Counts a run of job `n` (HINCRBY <prefix>interop.runs n 1; SADD <prefix>interop.python n)."""
    r = record_store()
    pipe = r.pipeline()
    pipe.hincrby(f"{PREFIX}interop.runs", str(n), 1)
    pipe.sadd(f"{PREFIX}interop.python", str(n))
    pipe.execute()
    time.sleep(ms / 1000.0)
    return n


@app.task(name="interop.handoff", bind=True)
def handoff(self, key):
    """The Rust side always retries this job; whichever retry reaches Python ends it here."""
    return {"key": key, "ran_on": "python", "retries": self.request.retries}


@app.task(name="interop.to_rust", bind=True, max_retries=None)
def to_rust(self, key):
    """Always retries here (1 s countdown), counting its runs; the Rust side of the test ends it."""
    record_store().incr(f"{PREFIX}interop.to_rust.runs")
    raise self.retry(countdown=1)
