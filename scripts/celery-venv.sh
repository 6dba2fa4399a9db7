#!/usr/bin/env bash
# Creates (once) a Python venv holding real Celery 5.7.0, pinned, for Celerity's interop tests and CI.
#
#   scripts/celery-venv.sh            # -> prints the venv's python path as the last line of stdout
#
# The venv lives at ${CELERITY_VENV:-<repo>/target/celery-venv}. It is rebuilt only when the marker
# file inside it does not match the pinned requirement list below, so repeated calls are cheap.
# Several processes may call this at once: an exclusive flock on "<venv>.lock" serializes them.
# Everything pip prints goes to stderr (and pip runs with -q), so stdout carries only the path.
# Set PYTHON to choose the interpreter used to create the venv (default: python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CELERITY_VENV:-$repo/target/celery-venv}"
python="${PYTHON:-python3}"

# Pinned: celery[redis]==5.7.0 and its whole dependency closure, so every run gets the same bytes.
requirements=(
  "celery[redis]==5.7.0"
  "kombu==5.7.0"
  "amqp==5.4.2"
  "billiard==4.3.2"
  "vine==5.1.0"
  "redis==8.1.0"
  "click==8.5.1"
  "click-didyoumean==0.3.1"
  "click-plugins==1.1.1.2"
  "click-repl==0.4.1"
  "prompt_toolkit==3.0.53"
  "wcwidth==0.9.4"
  "python-dateutil==2.9.0.post0"
  "six==1.17.0"
  "tzlocal==5.4.5"
  "packaging==26.3"
  "typing_extensions==4.16.0"
)
marker_content="celerity-celery-venv v1: ${requirements[*]}"
marker="$venv/.celerity-venv-marker"
venv_python="$venv/bin/python"

is_ready() {
  [[ -x "$venv_python" && -f "$marker" ]] && [[ "$(cat "$marker")" == "$marker_content" ]]
}

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if ! is_ready; then
  echo "celery-venv: creating $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv" >&2
  "$venv_python" -m pip install -q --disable-pip-version-check "${requirements[@]}" >&2
  # Fail loudly if what got installed is not what we pinned.
  "$venv_python" -c 'import celery, kombu, amqp, redis; assert celery.__version__ == "5.7.0", celery.__version__; assert kombu.__version__ == "5.7.0", kombu.__version__' >&2
  printf '%s' "$marker_content" >"$marker"
fi

flock -u 9
echo "$venv_python"
