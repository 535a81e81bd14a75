#!/usr/bin/env bash
# Ordered delivery at the issue's scale: 10,000 events over 50 keys, two workers (prefork -c 2)
# on each broker, 4 concurrent publishers, handlers sleeping 0-20 ms: tests/test_ordering_delivery.py
# with larger counts. Three runs a broker: no faults; pool processes SIGKILLed (100, 0.4 s apart,
# at least 40 s of kills, against the suite's 4); and a whole worker SIGKILLed twice and restarted,
# events_relay beside (it sends again what the filesystem transport, which keeps no copy of a
# taken message, lost with the worker). Each prints its counts: lost, run twice, out of order.
# Figures of a run: docs/ordering.md, "Tests and figures".
#   scripts/ordering_soak.sh                      # SQLite
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres scripts/ordering_soak.sh
#   ORDERING_SOAK_BROKERS="amqp or redis" scripts/ordering_soak.sh
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export DJANGO_EVENTS_ORDERING_EVENTS=${DJANGO_EVENTS_ORDERING_EVENTS:-10000}
export DJANGO_EVENTS_ORDERING_KEYS=${DJANGO_EVENTS_ORDERING_KEYS:-50}
export DJANGO_EVENTS_ORDERING_KILLS=${DJANGO_EVENTS_ORDERING_KILLS:-100}
BROKERS=${ORDERING_SOAK_BROKERS:-filesystem or amqp or redis}
# The suite's pytest-timeout (300 s a test, pyproject.toml) would stop a run of this size
# midway; each test waits for as long as its deliveries keep succeeding.
exec .venv/bin/python -m pytest -q -p no:randomly -s --timeout 3600 tests/test_ordering_delivery.py \
  -k "(per_key or sigkilled) and ($BROKERS)" "$@"
