"""What ``events_lock`` and ``events_compat`` check before they lock or compare the contract.

Both skip Django's system-check pass: its ``django_events.W130`` (the lock file is stale)
tells to run these very commands, and the rest (handlers, Celery, other apps) does not
change the contract. They run the checks of what the lock holds instead: settings,
manifests, schemas and upcasters.
"""

from __future__ import annotations

from django.core.checks import CheckMessage
from django.core.management.base import BaseCommand, CommandError

from django_events.checks import check_configuration, check_upcasters
from django_events.wiring.compiled import Registry
from django_events.wiring.registry import get_registry, reset_registry


def line(message: CheckMessage) -> str:
    """A check message as ``events_check`` prints it: ``origin: (id) message`` and the hint."""
    hint = f"\n    HINT: {message.hint}" if message.hint else ""
    return f"{message.obj}: ({message.id}) {message.msg}{hint}"


def checked_contract(command: BaseCommand, refusal: str) -> Registry:
    """The registry read from the manifests as they are on disk now; its warnings written to
    ``command``'s stderr; a `CommandError` starting with ``refusal`` if it has errors."""
    reset_registry()
    messages = [*check_configuration(), *check_upcasters()]
    errors = [line(m) for m in messages if m.is_serious()]
    if errors:
        raise CommandError(f"{refusal} (events_check):\n" + "\n".join(errors))
    for message in messages:
        command.stderr.write(line(message))
    return get_registry()
