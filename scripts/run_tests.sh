#!/usr/bin/env bash
# The whole test suite, set-up included: README's test command, and what .ci/run calls.
#   1. starts PostgreSQL / RabbitMQ / Redis on loopback if one has stopped (docs/contributing.md);
#   2. creates .venv (python3, Django 5.2) and .venv-django61 (Python 3.13, Django 6.1),
#      side by side;
#   3. ruff and mypy, and the Sphinx docs with warnings as errors;
#   4. the tests with real celery workers on SQLite (the filesystem transport), then every
#      test on PostgreSQL with coverage (real workers on RabbitMQ and Redis; the
#      filesystem-transport lines the SQLite pass ran are left out), each followed by the
#      example project's own tests (example_project/tests);
#   5. beside step 4: the tests without servers on Django 6.1 and SQLite (the other tests
#      that can reach a database run on SQLite there), the broker tests on the oldest Celery
#      and kombu, and a smoke run of the benchmarks (each once with a tiny count, nothing
#      timed); their output follows step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
PG_URL=${DJANGO_EVENTS_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres}

step() { printf '\n== %s  [%dm%02ds]\n' "$*" $((SECONDS / 60)) $((SECONDS % 60)); }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# `beside NAME COMMAND...` runs COMMAND in the background, its output kept in a file;
# `joined NAME` waits for it, prints that output, and stops the run if COMMAND failed.
# COMMAND runs in a subshell: bash (not every shell) starts a background command with SIGINT
# ignored, and the commands a background subshell runs get back the disposition the script
# started with, so Ctrl+C at a terminal stops them too.
declare -A BESIDE_PID BESIDE_LOG
beside() {
  local name=$1
  shift
  BESIDE_LOG[$name]=$(mktemp)
  ("$@") >"${BESIDE_LOG[$name]}" 2>&1 &
  BESIDE_PID[$name]=$!
}
joined() {
  local name=$1 status=0
  wait "${BESIDE_PID[$name]}" || status=$?
  unset "BESIDE_PID[$name]"
  cat "${BESIDE_LOG[$name]}" && rm -f "${BESIDE_LOG[$name]}"
  [ "$status" = 0 ] || { echo "$name failed (exit $status)" >&2; exit 1; }
}
# `timed COMMAND...` runs COMMAND, then prints its wall time and the CPU time of it and of
# what it started and waited for (test processes, celery workers). On two cores the suite is
# CPU-bound from the first pass to the last: a change to a pass is weighed by its CPU. In a
# subshell: `time` counts every child its shell reaps meanwhile, `beside`'s included.
timed() {
  (
    TIMEFORMAT="   (%0R s; CPU %0U s user + %0S s system, with what it started)"
    time "$@"
  )
}
# pytest exits 5 when a pass selected no test: with a user's `-k` or `-m` (this script's
# arguments), a pass may have none, which is not a failure.
USER_ARGS=$#
no_tests_allowed() {
  local status=0
  "$@" || status=$?
  [ "$status" = 0 ] || { [ "$status" = 5 ] && [ "$USER_ARGS" -gt 0 ]; }
}
# A step that fails waits for what runs in the background (its output is then not shown).
trap 'for pid in "${BESIDE_PID[@]}"; do wait "$pid" 2>/dev/null || true; done' EXIT

ensure_services() {
  if ! port_open 5432 && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
  fi
  if ! port_open 6379 && command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no || true
  fi
  if ! port_open 5672 && command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached || true
  fi
  for port in 5432 6379 5672; do
    for _ in $(seq 1 60); do port_open "$port" && break; sleep 1; done
    port_open "$port" || echo "warning: nothing listens on 127.0.0.1:$port (server tests will fail under CI)"
  done
}

ensure_chromium() {  # the admin's browser test drives Debian's chromium (never `playwright install`)
  command -v chromium >/dev/null && return
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is missing and cannot be installed here (the browser test will fail under CI)"
  fi
}

make_venv() {  # make_venv DIR PYTHON DJANGO_SPEC [PIP ARGS...]
  local dir=$1 python=$2 django=$3
  shift 3
  if [ ! -x "$dir/bin/python" ]; then
    "$python" -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install -q --upgrade "pip>=25.1"
  "$dir/bin/python" -m pip install -q -e . --group test --group lint --group type "$@" "$django"
}

step "services"
ensure_services

step "environments"
ensure_chromium
PY313=$(PYENV_VERSION=3.13.0 pyenv which python 2>/dev/null || command -v python3.13 || true)
if [ -n "$PY313" ]; then
  # Built beside .venv (a pip install keeps one core busy). The oldest Celery and kombu that
  # pyproject.toml allows: their private APIs are tested there.
  beside venv-django61 make_venv .venv-django61 "$PY313" "django>=6.1,<6.2" "celery==5.5.0" "kombu==5.5.2"
elif [ -n "${CI:-}" ]; then
  echo "Python 3.13 not found: Django 6.1 cannot be tested" >&2; exit 1
fi
make_venv .venv python3 "django>=5.2,<5.3" --group bench --group docs
[ -z "$PY313" ] || joined venv-django61

step "AsyncAPI parser (@asyncapi/parser from npm, for tests/test_asyncapi.py)"
if command -v npm >/dev/null; then
  (cd tests/asyncapi && npm ci --no-audit --no-fund --loglevel=error)
elif [ -n "${CI:-}" ]; then
  echo "npm not found: the AsyncAPI parser cannot be installed" >&2; exit 1
fi

# PYTHONDONTWRITEBYTECODE (above, and set on the CI machine) keeps imports from writing .pyc
# files: without these, every Python process of the suite (each `celery worker` a test starts)
# compiled the package and the test modules again, 0.1-0.2 s of CPU each.
step "bytecode of the package, the tests, the example project and the benchmarks"
for venv in .venv .venv-django61; do
  [ ! -x "$venv/bin/python" ] || "$venv/bin/python" -m compileall -q -x node_modules django_events tests example_project benchmarks
done

step "ruff"
.venv/bin/ruff check django_events tests example_project docs benchmarks
step "import layers (lint-imports: a module imports only from the layers below it)"
.venv/bin/lint-imports
step "mypy"
.venv/bin/mypy django_events

step "docs (Sphinx, warnings are errors)"
rm -rf docs/_build
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

# Test processes per pass (pytest-xdist): the suite mostly waits on workers, brokers and
# browsers (two processes left the two cores idle half the time), so four run on two cores;
# each has its own test databases (tests/settings.py) and queues. Timings in
# docs/contributing.md. PYTEST_PROCESSES=0 runs in this process.
PROCESSES=${PYTEST_PROCESSES:-4}
# "worksteal": a process that ran out of tests takes some of another's. With the default
# ("load"), in a measured PostgreSQL pass, one process still ran the tests it had been handed
# two minutes after the other three had finished (docs/contributing.md).
XDIST=(-n "$PROCESSES" --dist worksteal)

oldest_celery_passes() {
  # PostgreSQL: RabbitMQ and Redis workers run in the PostgreSQL pass only (tests/brokers.py).
  DATABASE_URL=$PG_URL .venv-django61/bin/python -m pytest -q "${XDIST[@]}" tests/test_private_apis.py \
    tests/test_confirms.py tests/test_filesystem_transport.py tests/test_delivery.py tests/test_tasks_delivery.py &&
    .venv-django61/bin/python -m pytest -q "${XDIST[@]}" tests/test_tasks_delivery.py
}
# These run beside the SQLite pass (with it they keep both cores busy), and on into the
# PostgreSQL pass if they last longer (each pass has its own databases and queues); their
# output follows the PostgreSQL pass.
if [ -n "$PY313" ]; then
  step "started: the oldest Celery and kombu allowed (5.5.0, 5.5.2), real brokers and workers; django.tasks (not the backport) with db_worker"
  beside oldest-celery timed oldest_celery_passes
fi
step "started: the benchmarks' smoke run (each once, tiny counts; nothing is timed or judged)"
beside benchmark-smoke timed env DATABASE_URL="$PG_URL" .venv/bin/python -m benchmarks --smoke

# The SQLite pass runs the tests with a real worker (`servers`: the filesystem transport, the
# embedded default), or, without Python 3.13, every test that can reach a database
# (`database`, tests/conftest.py). The PostgreSQL pass runs every test but the
# filesystem-transport lines of the delivery tests that the SQLite pass ran (`embedded`,
# tests/brokers.py; PostgreSQL-only ones stay), measured: branch coverage, the celery worker
# and other subprocesses included ([tool.coverage] in pyproject.toml).
SQLITE_TESTS="database and servers"
SQLITE_WHAT="real workers on the filesystem transport"
if [ -z "$PY313" ]; then
  SQLITE_TESTS=database SQLITE_WHAT="the tests that can reach a database"
fi
COVERAGE_FLOOR=95  # measured: 97% on 2026-12-06 (PostgreSQL pass, workers and pool children included)
rm -rf tests/var/coverage && mkdir -p tests/var/coverage
step "tests: Django 5.2, SQLite (-m \"$SQLITE_TESTS\": $SQLITE_WHAT)"
timed no_tests_allowed .venv/bin/python -m pytest -q "${XDIST[@]}" -m "$SQLITE_TESTS" "$@"
step "tests: the example project's own suite (captured_events / events_eager), SQLite"
(cd example_project && ../.venv/bin/python -m pytest -q)
if [ -n "$PY313" ]; then
  # Every test that needs no server, on Django 6.1: SQLite's database tests run here, not in
  # the Django 5.2 SQLite pass too (PostgreSQL's pass runs them on 5.2). Beside the
  # PostgreSQL pass, whose tests leave a core idle about a quarter of the time: beside the
  # SQLite pass, which with the runs above keeps both cores busy, it only made that longer.
  step "started: Django 6.1 on Python 3.13, SQLite, the tests without servers"
  beside django61 timed no_tests_allowed .venv-django61/bin/python -m pytest -q "${XDIST[@]}" -m "not servers" "$@"
fi
step "tests: Django 5.2, PostgreSQL (every test but the embedded lines, with coverage)"
DATABASE_URL=$PG_URL timed no_tests_allowed .venv/bin/coverage run -m pytest -q "${XDIST[@]}" -m "not embedded or postgresql" "$@"
step "tests: the example project's own suite, PostgreSQL"
(cd example_project && DATABASE_URL=$PG_URL ../.venv/bin/python -m pytest -q)
step "coverage (branch, the PostgreSQL pass; floor ${COVERAGE_FLOOR}%, for the whole suite only)"
.venv/bin/coverage combine -q
# A run filtered by the user's arguments measures part of the suite: no floor then.
[ "$USER_ARGS" -gt 0 ] && COVERAGE_FLOOR=0
.venv/bin/coverage report --fail-under="$COVERAGE_FLOOR" | tail -n 25
if [ -n "$PY313" ]; then
  step "tests: Django 6.1 on Python 3.13, SQLite, without servers: output"
  joined django61
  step "tests: the oldest Celery and kombu allowed: output"
  joined oldest-celery
fi
step "benchmarks: the smoke run's output"
joined benchmark-smoke
step "all passed"
