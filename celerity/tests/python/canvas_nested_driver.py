"""Builds nested canvases with Python Celery for celerity/tests/canvas_nested_interop.rs.

  canvas_nested_driver.py build    sends each nested canvas below, waits for it with Python's
                                   AsyncResult/GroupResult and prints what Python read (one JSON
                                   line); whichever worker consumes CANVAS_QUEUE runs them
  canvas_nested_driver.py read ID  reads one result by id (a failure as "Type: message")

Where it connects comes from the environment, as for canvas_app.py.
"""

import json
import sys

from celery import chain, chord, group
from celery.result import AsyncResult

from canvas_app import add, app, fail, mul, xsum

TIMEOUT = 60


def outcome(result):
    try:
        return result.get(timeout=TIMEOUT)
    except Exception as e:  # the test compares the text
        return f"{type(e).__name__}: {e}"


def build():
    out = {}
    # A group as a chain step followed by another step: Celery sends a chord as the next step.
    out["group_step"] = outcome(chain(add.s(1, 1), group(add.s(1), add.s(2)), xsum.s()).apply_async())
    # A group as the last step: the chain's result is a GroupResult.
    out["group_last"] = outcome(chain(add.s(1, 1), group(add.s(10), mul.s(10))).apply_async())
    # A chord whose body is a chain.
    out["chain_body"] = outcome(
        chord([add.s(1, 1), add.s(2, 2)], chain(xsum.s(), add.s(100), mul.s(2))).apply_async()
    )
    # A group of chains (and a plain member).
    out["group_of_chains"] = outcome(
        group(chain(add.s(1, 1), add.s(10)), chain(add.s(2, 2), mul.s(10)), add.s(5, 5)).apply_async()
    )
    # A chord whose header holds a chain.
    out["chain_in_header"] = outcome(chord([chain(add.s(1, 1), add.s(10)), add.s(3, 3)], xsum.s()).apply_async())
    # A chord as a middle step of a chain.
    out["chord_step"] = outcome(
        chain(add.s(1, 1), chord([add.s(1), add.s(2)], xsum.s()), mul.s(10)).apply_async()
    )
    # A member of the chord made from group | step fails: the last step's stored result.
    bad = chain(add.s(1, 1), group(add.s(1), fail.si("member broke")), xsum.s(), mul.s(2)).apply_async()
    out["bad_last"] = outcome(AsyncResult(bad.id, app=app))
    print(json.dumps(out))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build()
    elif sys.argv[1] == "read":
        print(json.dumps({"result": outcome(AsyncResult(sys.argv[2], app=app))}))
