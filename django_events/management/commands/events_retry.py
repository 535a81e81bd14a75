from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_events.delivery.endpoints import EndpointSubscription
from django_events.management.base import EventLogCommand, add_database_argument
from django_events.operations.redelivery import (
    RedeliveryResult,
    find_subscription,
    unknown_subscription,
)
from django_events.operations.retrying import retry_failures, select_failures
from django_events.operations.timerange import EXAMPLES, parse_range
from django_events.wiring.registry import get_registry


class Command(EventLogCommand):
    help = (
        "Deliver failed deliveries again through the normal path (async: a new task message; "
        "sync: the handler runs here). Attempts keep counting."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--all", action="store_true", help="Every failed delivery.")
        parser.add_argument("--subscription", help="Only failures of this subscription.")
        parser.add_argument("--event", help="Only failures of events with this name.")
        parser.add_argument("--since", help=f"Only failures recorded since: {EXAMPLES}.")
        parser.add_argument("--until", help="Only failures recorded before this moment.")
        add_database_argument(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        narrowed = any(options[k] for k in ("subscription", "event", "since", "until"))
        if not narrowed and not options["all"]:
            raise CommandError(
                "Say which failures to retry: --all, or --subscription/--event/--since/--until."
            )
        registry = get_registry()
        subscription = options["subscription"]
        if subscription:
            found = find_subscription(subscription, registry)
            if found is None:
                raise CommandError(unknown_subscription(subscription, registry))
            if isinstance(found, EndpointSubscription) and found.disabled:
                # Each attempt would fail without a call, as a replay's would.
                raise CommandError(
                    f"Webhook endpoint {subscription!r} is disabled: enable it first"
                )
        if options["event"] and options["event"] not in registry.events:
            raise CommandError(f"Unknown event {options['event']!r}")
        try:
            since, until = parse_range(options["since"], options["until"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        failures = select_failures(
            subscription=options["subscription"],
            event=options["event"],
            using=self.database(options),
            since=since,
            until=until,
        )
        result = retry_failures(failures)
        for reason in result.skipped:
            self.stderr.write(f"Skipped {reason}")
        self.stdout.write(f"Retried failed deliveries: {result.summary()}")
        if result.unsent:
            raise CommandError("The broker did not take every delivery; they stay failed.")
        if (result.skipped or result.disabled) and not result.anything_done:
            raise CommandError(nothing_retried(result))


def nothing_retried(result: RedeliveryResult) -> str:
    """Why a retry that found failures (all skipped or left failed) retried none of them."""
    reasons = []
    if result.skipped:
        count = len(result.skipped)
        reasons.append(f"{count} {'was' if count == 1 else 'were'} skipped, for the reasons above")
    if result.disabled:
        whose = "the others'" if result.skipped else "their"
        reasons.append(f"{whose} webhook endpoints are disabled; enable them first")
    return f"No failed delivery was retried: {'; '.join(reasons)}."
