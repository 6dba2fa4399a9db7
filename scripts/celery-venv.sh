#!/usr/bin/env bash
# Creates (once) a Python venv holding real Celery 5.7.0, pinned, for Celerity's interop tests and CI.
#
#   scripts/celery-venv.sh            # -> prints the venv's python path as the last line of stdout
#
# The venv lives at ${CELERITY_VENV:-<repo>/target/celery-venv}. It is rebuilt only when the marker
# file inside it does not match the pinned requirement list (scripts/venv-lib.sh), so repeated calls are cheap.
# Several processes may call this at once: an exclusive flock on "<venv>.lock" serializes them.
# Everything pip prints goes to stderr (and pip runs with -q), so stdout carries only the path.
# Set PYTHON to choose the interpreter used to create the venv (default: python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CELERITY_VENV:-$repo/target/celery-venv}"
# shellcheck source=scripts/venv-lib.sh
source "$repo/scripts/venv-lib.sh"
make_pinned_venv "$venv" "celerity-celery-venv v2" \
  'import celery, kombu, amqp, redis, sqlalchemy, psycopg2; assert celery.__version__ == "5.7.0", celery.__version__; assert kombu.__version__ == "5.7.0", kombu.__version__' \
  "${celery_requirements[@]}"
