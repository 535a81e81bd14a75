from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_events.conf import conf
from django_events.management.contract import checked_contract
from django_events.wiring.contracts import COVERABLE, Change, compare, lock_data, read_lock

_REVIEW_KINDS = "(removed, queue changed, check by hand)"


class Command(BaseCommand):
    help = (
        "Compare the declarations with a lock file and classify each change; exit 1 on a "
        "breaking change without a version bump and an upcaster, or a change that only a "
        f"review accepts {_REVIEW_KINDS}."
    )
    # Not Django's system checks: W130 (the lock is stale) only says to run this command.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--against",
            help="Lock file to compare with (default: DJANGO_EVENTS['LOCK_FILE']).",
        )
        parser.add_argument("--format", choices=["text", "json"], default="text")

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["against"]) if options["against"] else conf.LOCK_FILE
        try:
            locked = read_lock(path)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        registry = checked_contract(self, "The configuration is broken")
        changes = compare(locked, lock_data(registry))
        failing = [c for c in changes if c.fails]
        uncovered = sum(c.kind in COVERABLE for c in failing)
        for_review = len(failing) - uncovered
        if options["format"] == "json":
            report = {
                "against": str(path),
                "ok": not failing,
                "changes": [c.as_dict() for c in changes],
            }
            self.stdout.write(json.dumps(report, indent=2))
        else:
            for change in changes:
                self.stdout.write(str(change))
            self.stdout.write(_summary(changes, path, uncovered, for_review))
        if failing:
            raise CommandError(_refusal(uncovered, for_review), returncode=1)


def _summary(changes: list[Change], path: Path, uncovered: int, for_review: int) -> str:
    summary = (
        f"{len(changes)} change(s) against {path}, {uncovered} breaking without a version "
        "bump and an upcaster"
    )
    if for_review:
        summary += f", {for_review} that only a review accepts {_REVIEW_KINDS}"
    return f"{summary}."


def _refusal(uncovered: int, for_review: int) -> str:
    """Why the command fails, with what to do for each kind of change."""
    reasons = []
    if uncovered:
        reasons.append(
            f"{uncovered} breaking change(s): bump the event's version and add an upcaster "
            "(docs/evolving.md), or review and accept with events_lock"
        )
    if for_review:
        reasons.append(
            f"{for_review} change(s) that no version bump covers {_REVIEW_KINDS}: review "
            "them, then accept them with events_lock"
        )
    return "; ".join(reasons) + "."
