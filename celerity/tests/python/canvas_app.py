"""A Python Celery app for Celerity's workflow interop tests (celerity/tests/canvas_interop.rs).

It defines demo.add / demo.mul / demo.echo / demo.fail with the behaviour of Celerity's built-in
demo tasks (worker/src/demo.rs), so either side can run a workflow the other built. Where it
connects comes from the environment, so `celery -A canvas_app worker` and canvas_driver.py agree:

  CANVAS_BROKER   broker URL (redis://… or amqp://…)
  CANVAS_BACKEND  result backend URL (redis://…)
  CANVAS_PREFIX   global_keyprefix for a Redis broker and for the Redis result backend
  CANVAS_QUEUE    the default queue
"""

import os

from celery import Celery

BROKER = os.environ["CANVAS_BROKER"]
BACKEND = os.environ["CANVAS_BACKEND"]
PREFIX = os.environ.get("CANVAS_PREFIX", "")
QUEUE = os.environ["CANVAS_QUEUE"]

app = Celery("canvas_app", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_hijack_root_logger=False,
)
if PREFIX:
    if BROKER.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": PREFIX}
    app.conf.result_backend_transport_options = {"global_keyprefix": PREFIX}


@app.task(name="demo.add")
def add(x, y):
    return x + y


@app.task(name="demo.mul")
def mul(x, y):
    return x * y


@app.task(name="demo.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task(name="demo.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="demo.xsum")
def xsum(numbers):
    return sum(numbers)
