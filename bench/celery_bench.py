"""The Python Celery side of Celerity's side-by-side benchmark (bench/).

Two uses:

* As a Celery app for the worker: ``python -m celery -A celery_bench worker -Q QUEUE ...`` with the
  working directory set to bench/. It declares ``demo.noop``, ``demo.add`` and ``demo.sleep_ms``, the
  same names and shapes as the ``celerity`` binary's demo tasks.
* As the Celery producer the harness times: ``python celery_bench.py publish|latency ...``; it prints
  one JSON object on stdout.

Settings are Celery's defaults; only the broker, result backend, key prefix and log level come from
the environment the harness sets: BENCH_BROKER, BENCH_BACKEND ("" = no result backend),
BENCH_PG_SCHEMA (the schema of the result tables when BENCH_BACKEND is db+postgresql://) and
BENCH_PREFIX (kombu's ``global_keyprefix`` on Redis, so a run's keys can be found and deleted).
"""

import json
import os
import sys
import time

from celery import Celery

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0")
BACKEND = os.environ.get("BENCH_BACKEND", "") or None
PREFIX = os.environ.get("BENCH_PREFIX", "")

app = Celery("celery_bench", broker=BROKER, backend=BACKEND)
if PREFIX and BROKER.startswith("redis"):
    app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
if BACKEND and BACKEND.startswith("db+"):
    # Results in PostgreSQL (Celery's database backend): this run's tables in its own schema.
    schema = os.environ["BENCH_PG_SCHEMA"]
    app.conf.database_table_schemas = {"task": schema, "group": schema}
if PREFIX and BACKEND and BACKEND.startswith("redis"):
    app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}


@app.task(name="demo.noop")
def noop(*args, **kwargs):
    return None


@app.task(name="demo.add")
def add(x, y):
    return x + y


@app.task(name="demo.sleep_ms")
def sleep_ms(ms):
    time.sleep(ms / 1000.0)
    return ms


def publish(task, count, queue, sleep_arg):
    """Sends ``count`` jobs with ``app.send_task`` one by one (Celery has no bulk send)."""
    ids = []
    first = time.time()
    for i in range(count):
        if task == "demo.add":
            args = (i, i)
        elif task == "demo.sleep_ms":
            args = (sleep_arg,)
        else:
            args = ()
        ids.append(app.send_task(task, args=args, queue=queue).id)
    last = time.time()
    return {"first": first, "last": last, "ids": ids}


def latency(count, queue):
    """``count`` sequential add calls, each publish -> result in hand, in milliseconds."""
    samples = []
    for i in range(count):
        t = time.perf_counter()
        r = app.send_task("demo.add", args=(i, 1), queue=queue)
        value = r.get(timeout=30)
        samples.append((time.perf_counter() - t) * 1000.0)
        if value != i + 1:
            raise SystemExit(f"demo.add({i}, 1) returned {value!r}")
        r.forget()
    return {"ms": samples}


def main(argv):
    if len(argv) < 2:
        raise SystemExit("usage: celery_bench.py publish TASK COUNT QUEUE [SLEEP_MS] | latency COUNT QUEUE")
    if argv[1] == "publish":
        sleep_arg = int(argv[5]) if len(argv) > 5 else 100
        out = publish(argv[2], int(argv[3]), argv[4], sleep_arg)
    elif argv[1] == "latency":
        out = latency(int(argv[2]), argv[3])
    else:
        raise SystemExit(f"unknown command {argv[1]!r}")
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv)
