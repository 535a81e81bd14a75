#!/usr/bin/env bash
# Ordered delivery at the issue's scale: 10,000 events over 50 keys, two workers (prefork -c 2)
# on each broker, concurrent publishers (tests/test_ordering_delivery.py, larger counts).
#   scripts/ordering_soak.sh                      # SQLite
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres scripts/ordering_soak.sh
# Extra arguments go to pytest (e.g. -k amqp).
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_EVENTS_ORDERING_EVENTS=${DJANGO_EVENTS_ORDERING_EVENTS:-10000}
export DJANGO_EVENTS_ORDERING_KEYS=${DJANGO_EVENTS_ORDERING_KEYS:-50}
exec .venv/bin/python -m pytest -q -p no:randomly -s tests/test_ordering_delivery.py \
  -k "per_key or sigkilled" "$@"
