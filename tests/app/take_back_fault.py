"""A worker subprocess's database fault for one subscription (test_failure_control_delivery):
a resume committed just after the worker recorded a delivery held, then the take-back of that
row (held -> pending) fails as a connection lost at that moment would.

Installed on each of the process's connections as a Django execute wrapper, from
`TestAppConfig.ready` when ``DJANGO_EVENTS_TEST_REFUSE_TAKE_BACK`` names the subscription.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

logger = logging.getLogger("tests.take_back_fault")

# The line a test waits for: the worker met the fault.
REFUSED = "Injected fault: the take-back of a held row of"


def install(subscription: str) -> None:
    """Add the fault to every database connection this process opens."""

    def on_connection(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        if not any(getattr(w, "take_back_of", None) for w in connection.execute_wrappers):
            connection.execute_wrappers.append(_fault(subscription))

    connection_created.connect(on_connection, weak=False)


def _fault(subscription: str) -> Callable[..., Any]:
    from django_events.models import Delivery, PausedSubscription

    table = Delivery._meta.db_table

    def fault(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        ours = sql.startswith(f'UPDATE "{table}"') and subscription in (params or ())
        if ours and "held" in params and "pending" in params:  # the take-back
            logger.warning("%s %r: refused", REFUSED, subscription)
            raise OperationalError("injected: connection lost")
        result = execute(sql, params, many, context)
        if ours and "held" in params:  # the row just recorded held: a resume commits now
            PausedSubscription.objects.filter(subscription=subscription).delete()
        return result

    fault.take_back_of = subscription  # type: ignore[attr-defined]
    return fault
