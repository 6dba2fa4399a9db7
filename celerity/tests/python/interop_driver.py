"""Sends calls with Python Celery and waits for their results, for celerity/tests/interop/.

Usage: python interop_driver.py '<JSON list of calls>'  (configuration from the environment, see
interop_app.py). Each call is an object:

  via       "send_task" (app.send_task by name), "delay" (the task object's .delay) or
            "apply_async" (the task object's .apply_async with the options below)
  name      task name;  args (list), kwargs (object)
  countdown seconds;  expires seconds from now (negative: a time already past);  priority int;
  serializer (e.g. "pickle", to see it refused)
  timeout   seconds get() may wait (default 30)

All calls are sent first, then each result is waited for with AsyncResult.get(). One JSON line per
call is printed, in order: id, sent_at (unix seconds), state, and either ok/value or the exception
get() raised (class name, module, message), plus date_done (unix seconds or null).
"""

import datetime
import json
import sys
import time

from interop_app import app


def send(call):
    name = call["name"]
    args = call.get("args", [])
    kwargs = call.get("kwargs", {})
    options = {}
    if "countdown" in call:
        options["countdown"] = call["countdown"]
    if "expires" in call:
        options["expires"] = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=call["expires"]
        )
    if "priority" in call:
        options["priority"] = call["priority"]
    if "serializer" in call:
        options["serializer"] = call["serializer"]
    via = call.get("via", "send_task")
    if via == "send_task":
        return app.send_task(name, args=args, kwargs=kwargs, **options)
    task = app.tasks[name]
    if via == "delay":
        assert not options, "delay takes no options"
        return task.delay(*args, **kwargs)
    if via == "apply_async":
        return task.apply_async(args=args, kwargs=kwargs, **options)
    raise SystemExit(f"unknown via {via!r}")


def timestamp(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


def main():
    calls = json.loads(sys.argv[1])
    sent = []
    for call in calls:
        sent_at = time.time()
        sent.append((call, send(call), sent_at))
    for call, res, sent_at in sent:
        out = {"id": res.id, "sent_at": sent_at}
        try:
            out["value"] = res.get(timeout=call.get("timeout", 30), propagate=True)
            out["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported to the Rust side as it is
            out["ok"] = False
            out["exc_class"] = type(e).__name__
            out["exc_module"] = type(e).__module__
            out["exc_message"] = str(e)
        out["state"] = res.state
        out["date_done"] = timestamp(res.date_done)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
