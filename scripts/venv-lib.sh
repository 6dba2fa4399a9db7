# Shared by scripts/celery-venv.sh and scripts/flower-venv.sh (sourced, not run): the pinned Celery
# closure, and the one way a pinned venv is made.
#
# make_pinned_venv VENV MARKER_NAME CHECK_PY REQUIREMENT...
#   Makes (once) a venv at VENV holding exactly REQUIREMENT..., then runs the python snippet CHECK_PY in
#   it to fail loudly if what got installed is not what was pinned. It is rebuilt only when the marker
#   file inside it ("MARKER_NAME: REQUIREMENT...") does not match, so repeated calls are cheap. Several
#   processes may call it at once: an exclusive flock on "VENV.lock" serializes them. pip prints to
#   stderr only; the venv's python path is the one line on stdout.

# celery[redis]==5.7.0 and its whole dependency closure, so every run gets the same bytes.
celery_requirements=(
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
  # The database result backend (`db+postgresql://`), for the PostgreSQL interop tests. SQLAlchemy
  # 2.0 (not 2.1): its `postgresql://` dialect is psycopg2, as most Celery set-ups have it.
  "sqlalchemy==2.0.58"
  "greenlet==3.5.6"
  "psycopg2-binary==2.9.13"
)

make_pinned_venv() {
  local venv="$1" marker_name="$2" check="$3"
  shift 3
  local python="${PYTHON:-python3}"
  local marker_content="$marker_name: $*"
  local marker="$venv/.celerity-venv-marker"
  local venv_python="$venv/bin/python"

  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
  if ! [[ -x "$venv_python" && -f "$marker" && "$(cat "$marker")" == "$marker_content" ]]; then
    echo "$marker_name: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv" >&2
    "$venv_python" -m pip install -q --disable-pip-version-check "$@" >&2
    "$venv_python" -c "$check" >&2
    printf '%s' "$marker_content" >"$marker"
  fi
  flock -u 9
  echo "$venv_python"
}
