"""Benchmark the admin changelists on PostgreSQL with a million events.

Fills a throw-away PostgreSQL database with N events (default 1,000,000; generate_series,
so it takes seconds, not minutes), one succeeded delivery each and a failed one for every
100th event, then requests admin pages through Django's test client and reports, per page,
the number of SQL queries, the median time and the slowest query. A plain ModelAdmin of the
same models (an admin site of its own) is measured side by side as the baseline.

    python benchmarks/bench_admin.py             # 1,000,000 events
    python benchmarks/bench_admin.py --smoke     # 2,000 events, for CI
    python benchmarks/bench_admin.py --keep      # keep the database (reused by the next run)

Not a timed test: it prints figures (docs/admin.md quotes them) and fails only on errors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
FAILED_EVERY = 100
DASHBOARD_TARGET = 2.0  # the dashboard's median page time / the event log changelist's
NAMES = ["orders.placed", "orders.shipped", "orders.cancelled"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to create")
    parser.add_argument("--smoke", action="store_true", help="2,000 events, 2 repetitions")
    parser.add_argument("--repeat", type=int, default=7, help="requests per page (median)")
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "DJANGO_EVENTS_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres"
        ),
        help="PostgreSQL server (its database is only used to create the benchmark's own)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database for a rerun")
    args = parser.parse_args(argv)
    if args.smoke:
        args.events, args.repeat = 2_000, 2
    if args.events < FAILED_EVERY or args.repeat < 1:
        parser.error(f"--events must be >= {FAILED_EVERY} and --repeat >= 1")

    db_name = f"bench_admin_{args.events}" if args.keep else f"bench_admin_{os.getpid()}"
    created = create_database(args.url, db_name, reuse=args.keep)
    try:
        setup_django(args.url, db_name)
        if created:
            fill(args.events)
            # The pages get a connection of their own, as a live server's do: on the one that
            # created and filled the tables, the dashboard's (parallel) query took 2-3x longer.
            from django.db import connections

            connections.close_all()
        report(run_pages(args.repeat), args.events)
    finally:
        if not args.keep:
            from django.db import connections

            connections.close_all()
            drop_database(args.url, db_name)
    return 0


def _server(url: str) -> Any:
    import psycopg

    parsed = urlparse(url)
    return psycopg.connect(
        host=parsed.hostname or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username or "postgres",
        password=parsed.password or None,
        dbname=parsed.path.lstrip("/") or "postgres",
        autocommit=True,
    )


def create_database(url: str, name: str, *, reuse: bool) -> bool:
    """Create ``name``; False when ``reuse`` and it already exists (filled by a kept run)."""
    with _server(url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists and reuse:
            return False
        if exists:
            conn.execute(f'DROP DATABASE "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return True


def drop_database(url: str, name: str) -> None:
    with _server(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def setup_django(url: str, db_name: str) -> None:
    sys.path.insert(0, str(ROOT))
    parsed = urlparse(url)
    os.environ["DATABASE_URL"] = urlunparse(parsed._replace(path=f"/{db_name}"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    from django.conf import settings

    django.setup()
    settings.ROOT_URLCONF = _urlconf()
    settings.ALLOWED_HOSTS = ["testserver"]
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _urlconf() -> types.ModuleType:
    """Our admin at /admin/, plain ModelAdmins of the same models at /baseline/."""
    from django.contrib import admin
    from django.contrib.auth.admin import UserAdmin
    from django.contrib.auth.models import User
    from django.urls import path

    from django_events.models import EventRecord, Failure

    baseline = admin.AdminSite(name="baseline")
    baseline.register(User, UserAdmin)

    class PlainEvents(admin.ModelAdmin):  # type: ignore[type-arg]
        list_display = ("name", "occurred_at", "status")
        change_list_template = "admin/change_list.html"  # not ours, which links the wiring
        list_per_page = 50

    class PlainFailures(admin.ModelAdmin):  # type: ignore[type-arg]
        list_display = ("subscription", "event", "attempts", "last_error")
        change_form_template = "admin/change_form.html"
        raw_id_fields = ("event",)  # a <select> of every event would not render at 1M rows
        list_per_page = 50

    baseline.register(EventRecord, PlainEvents)
    baseline.register(Failure, PlainFailures)
    module = types.ModuleType("bench_admin_urls")
    module.urlpatterns = [  # type: ignore[attr-defined]
        path("admin/", admin.site.urls),
        path("baseline/", baseline.urls),
    ]
    return module


def fill(count: int) -> None:
    """``count`` events over the last year, a delivery each, a failure every 100th."""
    from django.db import connection

    started = time.perf_counter()
    names = "ARRAY[" + ", ".join(f"'{n}'" for n in NAMES) + "]"
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO django_events_eventrecord
              (id, name, payload, headers, occurred_at, correlation_id, causation_id,
               status, dispatched_at)
            SELECT md5('e' || g)::uuid,
                   ({names})[1 + g %% {len(NAMES)}],
                   jsonb_build_object('order_id', g, 'total', (g %% 997) + 0.5,
                                      'email', 'user' || g || '@example.com'),
                   '{{"source": "bench"}}'::jsonb,
                   now() - make_interval(secs => g * 31.0),
                   md5('c' || (g / 3))::uuid,
                   CASE WHEN g %% 3 = 0 THEN NULL ELSE md5('e' || (g - 1))::uuid END,
                   CASE WHEN g %% 50000 = 0 THEN 'pending' ELSE 'dispatched' END,
                   now() - make_interval(secs => g * 31.0)
            FROM generate_series(1, %s) AS g
            """,
            [count],
        )
        cursor.execute(
            """
            INSERT INTO django_events_delivery
              (event_id, subscription, mode, status, attempts, last_error, traceback,
               created_at, updated_at, duration_ms, response_body)
            SELECT md5('e' || g)::uuid, 'bench-audit', 'sync', 'succeeded', 1, '', '',
                   now() - make_interval(secs => g * 31.0),
                   now() - make_interval(secs => g * 31.0),
                   0.3 + (g %% 50) * 0.9, ''
            FROM generate_series(1, %s) AS g
            """,
            [count],
        )
        cursor.execute(
            f"""
            INSERT INTO django_events_delivery
              (event_id, subscription, mode, status, attempts, last_error, traceback,
               created_at, updated_at, duration_ms, response_body)
            SELECT md5('e' || g)::uuid, 'bench-mail', 'async', 'failed', 3,
                   'SMTPError: 451 temporary failure for order ' || g,
                   repeat('  File "mail.py", line 12, in send' || chr(10), 20),
                   now() - make_interval(secs => g * 31.0),
                   now() - make_interval(secs => g * 31.0),
                   120 + (g %% 500), ''
            FROM generate_series({FAILED_EVERY}, %s, {FAILED_EVERY}) AS g
            """,
            [count],
        )
        cursor.execute("ANALYZE django_events_eventrecord")
        cursor.execute("ANALYZE django_events_delivery")
    print(f"filled {count:,} events in {time.perf_counter() - started:.1f} s", file=sys.stderr)


def run_pages(repeat: int) -> list[dict[str, Any]]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from django_events.models import Delivery, EventRecord

    user = User.objects.filter(username="bench").first() or User.objects.create_superuser(
        "bench", "bench@example.com", "bench"
    )
    client = Client()
    client.force_login(user)
    some = EventRecord.objects.order_by("-occurred_at").values_list("pk", "correlation_id")[500]
    failure = Delivery.objects.filter(status="failed").order_by("-updated_at").first()
    assert failure is not None
    month = EventRecord.objects.order_by("-occurred_at").values_list("occurred_at", flat=True)[0]
    events, failures = "django_events/eventrecord/", "django_events/failure/"
    deep = min(100, EventRecord.objects.count() // 50)
    pages = [
        ("event log", events, True),
        (f"event log, page {deep}", events + f"?p={deep}", True),
        ("event log, by name", events + "?name=orders.placed", True),
        ("event log, pending", events + "?status__exact=pending", True),
        (
            "event log, a month",
            events + f"?occurred_at__year={month.year}&occurred_at__month={month.month}",
            True,
        ),
        ("event log, search by id", events + f"?q={some[0]}", False),
        ("event log, search by correlation", events + f"?q={some[1]}", False),
        ("event page", events + f"{some[0]}/change/", True),
        ("failures", failures, True),
        ("failures, by subscription", failures + "?subscription=bench-mail", False),
        ("failure page", failures + f"{failure.pk}/change/", True),
        ("wiring page", events + "wiring/", False),
        ("dashboard, last week", events + "dashboard/?window=week", False),
        ("dashboard, last hour", events + "dashboard/?window=hour", False),
    ]

    def measure(url: str) -> dict[str, Any]:
        response = client.get(url)  # warm-up (and a check)
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}")
        times, queries, slowest = [], 0, 0.0
        for _ in range(repeat):
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                client.get(url)
                times.append(time.perf_counter() - started)
            queries = len(captured)
            slowest = max(slowest, *(float(q["time"]) for q in captured.captured_queries))
        return {
            "queries": queries,
            "ms": statistics.median(times) * 1000,
            "slowest": slowest * 1000,
        }

    results = []
    for label, url, has_baseline in pages:
        baseline_url = url.replace("?name=", "?name__exact=")
        row = {"page": label, "ours": measure("/admin/" + url)}
        row["baseline"] = measure("/baseline/" + baseline_url) if has_baseline else None
        results.append(row)
    return results


def report(results: list[dict[str, Any]], count: int) -> None:
    print(f"\nAdmin pages on PostgreSQL, {count:,} events (median of the requests):\n")
    print("| page | queries | time | slowest query | plain admin: queries | time | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        ours, base = row["ours"], row["baseline"]
        cells = [
            row["page"],
            str(ours["queries"]),
            f"{ours['ms']:.1f} ms",
            f"{ours['slowest']:.1f} ms",
        ]
        if base:
            cells += [
                str(base["queries"]),
                f"{base['ms']:.1f} ms",
                f"{ours['ms'] / base['ms']:.2f}",
            ]
        else:
            cells += ["-", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    by_page = {row["page"]: row["ours"]["ms"] for row in results}
    dashboard = max(v for k, v in by_page.items() if k.startswith("dashboard"))
    ratio = dashboard / by_page["event log"]
    verdict = "met" if ratio <= DASHBOARD_TARGET else "NOT met"
    print(
        f"\ndashboard (slower window) vs the event log changelist: {dashboard:.1f} ms / "
        f"{by_page['event log']:.1f} ms = {ratio:.2f} (target <= {DASHBOARD_TARGET:g}: {verdict})"
    )


if __name__ == "__main__":
    sys.exit(main())
