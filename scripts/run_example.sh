#!/usr/bin/env bash
# Run the example shop end to end: migrate, check the wiring, start a real Celery worker,
# place orders, wait until every event was delivered and handled, stop the worker.
#
# Needs no servers: SQLite and kombu's filesystem transport, both under example_project/var/.
# Real servers (loopback only), e.g.:
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/django_events_example \
#   CELERY_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// scripts/run_example.sh
# Other knobs: ORDERS (orders to place, default 5), RESULTS_TIMEOUT (seconds, default 120).
#
# On Django's Tasks framework instead of Celery, with no broker at all (django-tasks-db's
# db_worker takes the tasks from the database):
#   scripts/run_example.sh --tasks        (or EVENTS_DELIVERY=tasks scripts/run_example.sh)
set -euo pipefail

case "${1:-}" in
  --tasks) export EVENTS_DELIVERY=tasks ;;
  "") ;;
  *) echo "usage: $0 [--tasks]" >&2; exit 2 ;;
esac
EVENTS_DELIVERY=${EVENTS_DELIVERY:-celery}
if [[ "$EVENTS_DELIVERY" != celery && "$EVENTS_DELIVERY" != tasks ]]; then
  echo "EVENTS_DELIVERY must be celery or tasks, not '$EVENTS_DELIVERY'" >&2; exit 2
fi

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
PROJECT="$ROOT/example_project"
VAR="$PROJECT/var"
VENV="$ROOT/.venv"
PYTHON="$VENV/bin/python"
WORKER_LOG="$VAR/worker.log"
WORKER_PID=""

step() { printf '\n==> %s\n' "$*"; }
hide_password() { sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#'; }

stop_worker() {
  local status=$?
  if [[ -n "$WORKER_PID" ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
    step "Stopping the worker (pid $WORKER_PID)"
    kill -TERM "$WORKER_PID"  # warm shutdown: running tasks finish first
    for _ in $(seq 1 60); do
      kill -0 "$WORKER_PID" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$WORKER_PID" 2>/dev/null; then
      echo "The worker did not stop within 30s; killing it."
      kill -KILL "$WORKER_PID" 2>/dev/null || true
    fi
    wait "$WORKER_PID" 2>/dev/null || true
    echo "Worker stopped."
  fi
  if ((status != 0)) && [[ -s "$WORKER_LOG" ]]; then
    step "Last lines of $WORKER_LOG"
    tail -n 30 "$WORKER_LOG"
  fi
  echo
  echo "Worker log:  $WORKER_LOG"
  if [[ -z "${DATABASE_URL:-}" ]]; then echo "Database:    $VAR/db.sqlite3"; fi
  if [[ "$EVENTS_DELIVERY" == tasks ]]; then
    echo "Broker:      none (the tasks are rows of the database, django-tasks-db)"
  elif [[ "${CELERY_BROKER_URL:-filesystem://}" == filesystem://* ]]; then
    echo "Broker:      $VAR/broker (filesystem transport)"
  fi
  if ((status == 0)); then echo "Example finished OK."; else echo "Example FAILED (exit $status)."; fi
  exit "$status"
}
trap stop_worker EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_for_worker() {
  # celery: "celery@host ready."; db_worker: "Starting worker worker_id=..."
  for _ in $(seq 1 120); do
    if grep -qE ' ready\.$|Starting worker worker_id=' "$WORKER_LOG" 2>/dev/null; then return 0; fi
    if ! kill -0 "$WORKER_PID" 2>/dev/null; then
      echo "The worker exited during start-up." >&2
      return 1
    fi
    sleep 0.5
  done
  echo "The worker was not ready after 60s." >&2
  return 1
}

if [[ ! -x "$PYTHON" ]]; then
  step "Creating a virtualenv in $VENV"
  python3 -m venv "$VENV"
fi
if [[ "$EVENTS_DELIVERY" == tasks ]]; then
  step "Installing django-event-wiring[tasks] (editable) and psycopg[binary] into $VENV"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$ROOT[tasks]" "psycopg[binary]"
else
  step "Installing django-event-wiring (editable), psycopg[binary] and celery[redis] into $VENV"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$ROOT" "psycopg[binary]" "celery[redis]"
fi

cd "$PROJECT"
mkdir -p "$VAR"
export PYTHONUNBUFFERED=1
echo "Database: ${DATABASE_URL:-sqlite (example_project/var/db.sqlite3)}" | hide_password
if [[ "$EVENTS_DELIVERY" == tasks ]]; then
  echo "Delivery: Django's Tasks framework (django-tasks-db, db_worker); no broker"
else
  echo "Broker:   ${CELERY_BROKER_URL:-filesystem:// (example_project/var/broker)}" | hide_password
fi

step "python manage.py migrate"
"$PYTHON" manage.py migrate --no-input

step "python manage.py events_check"
"$PYTHON" manage.py events_check

QUEUES="$("$PYTHON" manage.py events_queues)"
if [[ "$EVENTS_DELIVERY" == tasks ]]; then
  step "Starting db_worker for queues $QUEUES (log: $WORKER_LOG)"
  "$PYTHON" manage.py db_worker --queue-name "$QUEUES" --interval 0.2 --no-reload \
    >"$WORKER_LOG" 2>&1 &
else
  step "Starting a Celery worker for queues $QUEUES (log: $WORKER_LOG)"
  "$VENV/bin/celery" -A example_project worker -Q "$QUEUES" --pool prefork -c 2 --loglevel INFO \
    >"$WORKER_LOG" 2>&1 &
fi
WORKER_PID=$!
wait_for_worker
echo "Worker ready (pid $WORKER_PID)."

step "python manage.py place_orders --count ${ORDERS:-5}"
"$PYTHON" manage.py place_orders --count "${ORDERS:-5}"

step "python manage.py show_results"
"$PYTHON" manage.py show_results --timeout "${RESULTS_TIMEOUT:-120}"
