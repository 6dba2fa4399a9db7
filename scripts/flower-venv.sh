#!/usr/bin/env bash
# Creates (once) a Python venv holding Flower next to the same pinned Celery 5.7.0 as
# scripts/celery-venv.sh, for the test that checks Flower lists our workers. Kept apart from the
# Celery venv so adding Flower never rebuilds the venv other interop tests are running from.
#
#   scripts/flower-venv.sh            # -> prints the venv's python path as the last line of stdout
#
# The venv lives at ${CELERITY_FLOWER_VENV:-<repo>/target/flower-venv}; it is rebuilt only when the
# marker inside it does not match the pinned list. Concurrent callers serialize on a flock.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CELERITY_FLOWER_VENV:-$repo/target/flower-venv}"
# shellcheck source=scripts/venv-lib.sh
source "$repo/scripts/venv-lib.sh"
# Pinned: flower==2.2.0 and its own dependencies, then the Celery closure of celery-venv.sh.
make_pinned_venv "$venv" "celerity-flower-venv v1" \
  'import celery, flower; assert celery.__version__ == "5.7.0", celery.__version__; assert flower.__version__ == "2.2.0", flower.__version__' \
  "flower==2.2.0" "tornado==6.6.1" "prometheus_client==0.26.0" "humanize==4.17.0" "pytz==2026.6" \
  "${celery_requirements[@]}"
