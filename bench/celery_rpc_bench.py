"""The Celery side of the bench's rpc:// row (bench/src/rpcrow.rs): sends COUNT demo.add jobs with
app.send_task, then reads every result with AsyncResult.get() (results come back as messages on
this client's reply queue). Settings come from celery_bench.py's app (BENCH_BACKEND=rpc://).

Usage: python celery_rpc_bench.py COUNT QUEUE  ->  {"first": unix s, "last": unix s}
"""

import json
import sys
import time

from celery_bench import app


def main(argv):
    count, queue = int(argv[1]), argv[2]
    assert app.conf.result_backend.startswith("rpc://"), app.conf.result_backend
    first = time.time()
    sent = [app.send_task("demo.add", args=(i, i), queue=queue) for i in range(count)]
    for i, r in enumerate(sent):
        value = r.get(timeout=120)
        if value != 2 * i:
            raise SystemExit(f"demo.add({i}, {i}) returned {value!r}")
    last = time.time()
    json.dump({"first": first, "last": last}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
