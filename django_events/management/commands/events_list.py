from __future__ import annotations

import json
from argparse import BooleanOptionalAction
from typing import Any

from django.core.management.base import CommandParser
from django.db import DatabaseError, connections

from django_events.delivery import endpoints
from django_events.management.base import EventLogCommand, routed_elsewhere
from django_events.operations.pausing import pause_state
from django_events.operations.retrying import held_deliveries
from django_events.wiring.describing import describe_wiring
from django_events.wiring.listing import FORMATS, render


class Command(EventLogCommand):
    help = "Print the wiring: every event and its subscriptions (table, JSON or Mermaid)."
    # A broken configuration is listed too, ending with how many errors events_check reports.
    requires_system_checks: list[str] = []
    reads_only = True  # without --database: where the routers read the event log

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--format", choices=FORMATS, default="table", help="Output format (default: table)."
        )
        parser.add_argument(
            "--state",
            action="store_true",
            help="Also list paused subscriptions and held deliveries (reads the database).",
        )
        parser.add_argument(
            "--held",
            action="store_true",
            help="List the keys of ordered subscriptions with held deliveries instead "
            "(table or JSON; not with --state).",
        )
        parser.add_argument(
            "--endpoints",
            action=BooleanOptionalAction,
            default=True,
            help="List the webhook endpoints registered at run time (reads the database; "
            "--no-endpoints: the declarations only).",
        )
        parser.add_argument(
            "--database",
            default=None,
            choices=tuple(connections),
            help="Where --held and --state read the event log (default: where DATABASE_ROUTERS "
            "read it, default without routers), and the endpoints.",
        )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        self._parser = super().create_parser(prog_name, subcommand, **kwargs)
        return self._parser

    def handle(self, *args: Any, **options: Any) -> None:
        fmt = options["format"]
        # Usage errors (exit 2, the usage on stderr), as argparse's own: what an option
        # cannot do used to be left out without a word.
        if options["held"] and options["state"]:
            self._parser.error(
                "--held lists held deliveries instead of the wiring, and --state adds "
                "paused subscriptions to the wiring: use one of them"
            )
        if options["held"] and fmt == "mermaid":
            self._parser.error(
                "--held lists held deliveries in the table and JSON formats, "
                "not in --format mermaid"
            )
        if options["state"] and fmt == "mermaid":  # the chart has no place for the state
            self._parser.error(
                "--state lists paused subscriptions in the table and JSON formats, "
                "not in --format mermaid"
            )
        if options["held"]:
            self._held(options)
            return
        found = []
        if options["endpoints"]:
            try:
                found = endpoints.describe(using=options["database"])
            except DatabaseError as exc:  # the declarations need no database: list them
                self.stderr.write(f"Webhook endpoints not listed (database: {exc})")
        text = render(describe_wiring(endpoints=found), fmt)
        if not options["state"]:
            self.stdout.write(text)
            return
        alias = self.database(options)
        try:
            state = pause_state(using=alias)
        except DatabaseError as exc:  # the wiring needs no database: list it all the same
            note = routed_elsewhere(alias, read=True)
            self.stderr.write(f"Paused subscriptions unknown (database: {exc}){note}")
            state = {}
        if fmt == "json":
            data = json.loads(text)
            data["paused"] = {name: s["held"] for name, s in state.items() if s["paused"]}
            data["held"] = {name: s["held"] for name, s in state.items() if s["held"]}
            text = json.dumps(data, indent=2, sort_keys=True)
        elif fmt == "table" and state:
            # "active", as the admin's wiring page: "resumed" read as if it had been paused.
            lines = [
                f"{name}: {'paused' if s['paused'] else 'active'}, {s['held']} held"
                for name, s in sorted(state.items())
            ]
            text += "\n\nPaused or holding deliveries:\n  " + "\n  ".join(lines)
        self.stdout.write(text)

    def _held(self, options: dict[str, Any]) -> None:
        held = held_deliveries(self.database(options))
        if options["format"] == "json":
            self.stdout.write(json.dumps(held, indent=2, default=str))
            return
        for row in held:
            behind = _behind(row)
            key = "" if row["ordering_key"] is None else f" [{row['ordering_key']}]"
            self.stdout.write(f"{row['subscription']}{key}: {row['held']} held, {behind}")
        self.stdout.write(f"{sum(int(str(r['held'])) for r in held)} held delivery(ies)")


def _behind(row: dict[str, Any]) -> str:
    """What a key's held deliveries wait for: the pause only when their head is one of them
    (or they have no key to wait in); a failed head whatever the pause (a resume leaves them
    behind it, in order)."""
    head: dict[str, Any] | None = row["head"]  # None without a key: nothing is ahead
    name = row["subscription"]
    if row["paused"] and (head is None or head["status"] == "held"):
        return f"paused (events_resume {name} sends them)"
    if head is None:
        return "behind nothing (events_relay hands it on)"
    error = head["last_error"].splitlines()[0] if head["last_error"] else ""
    text = f"behind {head['event_id']} ({head['status']}, {head['attempts']} attempt(s))"
    text += f": {error}" if error else ""
    if head["status"] == "failed":
        text += "; retry it (events_retry) or mark it resolved (the admin) to send them"
    if row["paused"]:
        text += f"; paused too (events_resume {name} does not send them before it)"
    return text
