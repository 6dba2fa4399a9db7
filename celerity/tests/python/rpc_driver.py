"""Sends calls with Python Celery on the rpc:// result backend and waits for their results, for
celerity/tests/interop/rpc_backend.rs.

Usage: python rpc_driver.py '<JSON list of calls>' (configuration from the environment, see
interop_app.py; INTEROP_BACKEND is rpc://). Each call is {"name", "args", "kwargs", "timeout"}.
All calls are sent first, then each is waited for with AsyncResult.get(on_message=...), which
sees every state message of the task (RETRY, STARTED, ...). One JSON line per call, in order: id,
state, ok and value or the exception's class and message, and the states seen.
"""

import json
import sys

from interop_app import app


def main():
    assert app.conf.result_backend.startswith("rpc://"), app.conf.result_backend
    calls = json.loads(sys.argv[1])
    sent = [
        (call, app.send_task(call["name"], args=call.get("args", []), kwargs=call.get("kwargs", {})))
        for call in calls
    ]
    for call, res in sent:
        seen = []
        out = {"id": res.id}
        try:
            out["value"] = res.get(
                timeout=call.get("timeout", 30),
                on_message=lambda meta: seen.append(meta["status"]),
                propagate=True,
            )
            out["ok"] = True
        except Exception as e:  # noqa: BLE001 - reported to the Rust side as it is
            out["ok"] = False
            out["exc_class"] = type(e).__name__
            out["exc_message"] = str(e)
        out["state"] = res.state
        out["seen"] = seen
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
