"""Storage: the event log (which doubles as the outbox) and delivery outcomes."""

from __future__ import annotations

import uuid
from typing import ClassVar
from urllib.parse import urlsplit

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

# Once per process, where Django would fail anyway ("Model class ... isn't in an application
# in INSTALLED_APPS") at the first import of publish(), the admin or the inbound views.
if apps.get_containing_app_config(__name__) is None:
    raise ImproperlyConfigured(
        'django_events is not in INSTALLED_APPS: add "django_events" to INSTALLED_APPS to '
        "publish events (its models, task, checks and management commands need it)."
    )


class EventRecord(models.Model):
    """One published event: the event log, and the outbox while ``status`` is pending."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        DISPATCHED = "dispatched", _("dispatched")
        FAILED = "failed", _("failed")

    id = models.UUIDField(_("event id"), primary_key=True, editable=False)
    name = models.CharField(_("event name"), max_length=200)
    payload = models.JSONField(_("payload"), default=dict)
    version = models.PositiveIntegerField(
        _("version"),
        default=1,
        db_default=1,  # rows inserted by raw SQL (or before this column) are version 1
        help_text=_("Version of the event's contract the payload was published with."),
    )
    headers = models.JSONField(_("headers"), default=dict, blank=True)
    occurred_at = models.DateTimeField(_("occurred at"), default=timezone.now)
    correlation_id = models.UUIDField(
        _("correlation id"), help_text=_("Shared by every event of one chain.")
    )
    causation_id = models.UUIDField(
        _("causation id"),
        null=True,
        blank=True,
        help_text=_("The event whose handler published this one."),
    )
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=Status.choices,
        default=Status.PENDING,
        help_text=_("pending: not yet handed to the broker; dispatched: handed over."),
    )
    dispatched_at = models.DateTimeField(_("dispatched at"), null=True, blank=True)

    class Meta:
        verbose_name = _("event")
        verbose_name_plural = _("event log")
        ordering = ["-occurred_at"]
        indexes = [
            models.Index(fields=["name", "-occurred_at"], name="django_events_name_occ_idx"),
            models.Index(fields=["-occurred_at"], name="django_events_occurred_idx"),
            models.Index(fields=["correlation_id"], name="django_events_correlation_idx"),
            models.Index(fields=["causation_id"], name="django_events_causation_idx"),
            # The outbox: the relay scans only what is still pending, oldest first.
            models.Index(
                fields=["occurred_at"],
                name="django_events_pending_idx",
                condition=models.Q(status="pending"),
            ),
            # The relay's check for unfinished deliveries walks dispatched events in the
            # order they were dispatched, from where its last pass stopped.
            models.Index(
                fields=["dispatched_at", "id"],
                name="django_events_dispatched_idx",
                condition=models.Q(status="dispatched"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.id}"


class Delivery(models.Model):
    """The outcome of one subscription's handler for one event."""

    class Status(models.TextChoices):
        PENDING = "pending", _("pending")
        RUNNING = "running", _("running")
        SUCCEEDED = "succeeded", _("succeeded")
        FAILED = "failed", _("failed")
        RESOLVED = "resolved", _("resolved")
        HELD = "held", _("held")

    event = models.ForeignKey(
        EventRecord,
        on_delete=models.CASCADE,
        related_name="deliveries",
        verbose_name=_("event"),
    )
    subscription = models.CharField(_("subscription"), max_length=255)
    mode = models.CharField(_("mode"), max_length=8)
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.PENDING
    )
    attempts = models.PositiveIntegerField(
        _("attempts"), default=0, help_text=_("Runs of the handler, manual retries included.")
    )
    # db_default: rows written by a worker of the release before this column count none.
    uncounted = models.PositiveIntegerField(
        _("uncounted runs"),
        default=0,
        db_default=0,
        help_text=_(
            "Of the attempts, the runs not counted towards max_attempts: those that raised "
            "RetryLater(counts=False), and those before a replay."
        ),
    )
    last_error = models.TextField(_("last error"), blank=True, default="")
    traceback = models.TextField(_("traceback"), blank=True, default="")
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)
    retry_at = models.DateTimeField(
        _("retry due at"),
        null=True,
        blank=True,
        help_text=_(
            "Set when the worker could not hand a retry to the broker: "
            "events_relay sends it once due."
        ),
    )
    duration_ms = models.FloatField(
        _("handler time (ms)"),
        null=True,
        blank=True,
        help_text=_("How long the last run of the handler took; empty when not measured."),
    )
    response_status = models.PositiveSmallIntegerField(
        _("response status"),
        null=True,
        blank=True,
        help_text=_("Webhooks: the HTTP status of the last attempt's answer."),
    )
    response_ms = models.PositiveIntegerField(
        _("response time (ms)"),
        null=True,
        blank=True,
        help_text=_("Webhooks: milliseconds the last attempt took."),
    )
    response_body = models.TextField(
        _("response body"),
        blank=True,
        default="",
        help_text=_("Webhooks: the first kilobyte of the last answer's body."),
    )
    # NULL: not ordered; "" is a key (events without the value).
    ordering_key = models.CharField(  # noqa: DJ001
        _("ordering key"),
        max_length=255,
        null=True,
        blank=True,
        help_text=_("The key value of a subscription with ordering_key: one at a time per key."),
    )
    sequence = models.BigIntegerField(
        _("sequence"),
        null=True,
        blank=True,
        help_text=_("Recorded order of the event among its key's (assigned at publish)."),
    )

    class Meta:
        verbose_name = _("delivery")
        verbose_name_plural = _("deliveries")
        ordering = ["-updated_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["event", "subscription"], name="django_events_delivery_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["status", "-updated_at"], name="django_events_dlv_status_idx"),
            models.Index(fields=["subscription", "status"], name="django_events_dlv_sub_idx"),
            # The relay scans only the retries it has to send, oldest due first.
            models.Index(
                fields=["retry_at"],
                name="django_events_dlv_retry_idx",
                condition=models.Q(retry_at__isnull=False),
            ),
            # Ordered deliveries: what comes before a delivery of the same key.
            models.Index(
                fields=["subscription", "ordering_key", "sequence"],
                name="django_events_dlv_order_idx",
                condition=models.Q(sequence__isnull=False),
            ),
            # The same, unfinished ones only: a key's turn and its head are found without
            # walking through its history (PostgreSQL; SQLite does not match a partial index
            # to a query with bound parameters, and uses the one above).
            models.Index(
                fields=["subscription", "ordering_key", "sequence"],
                name="django_events_dlv_turn_idx",
                condition=models.Q(sequence__isnull=False)
                & ~models.Q(status__in=["succeeded", "resolved"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.subscription} <- {self.event_id} ({self.status})"


class OrderingGate(models.Model):
    """One key of an ordered subscription: the sequence counter, and the row workers lock.

    Publishers take the next sequence in their transaction (its row lock orders concurrent
    publishers of one key by commit); workers lock it to decide whose turn it is.
    """

    subscription = models.CharField(_("subscription"), max_length=255)
    key = models.CharField(_("key"), max_length=255)
    last_sequence = models.BigIntegerField(_("last sequence"), default=0)

    class Meta:
        verbose_name = _("ordering gate")
        verbose_name_plural = _("ordering gates")
        ordering = ["subscription", "key"]
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "key"], name="django_events_gate_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.subscription} [{self.key}] #{self.last_sequence}"


class RelayCheckpoint(models.Model):
    """How far the relay has checked dispatched events for deliveries with no outcome.

    One row per check (``name``); the relay locks it while it checks, so that two relays
    never resend the same delivery.
    """

    name = models.CharField(_("name"), max_length=100, unique=True)
    dispatched_at = models.DateTimeField(
        _("checked up to"),
        help_text=_("Events dispatched up to this time (and event id) have been checked."),
    )
    event_id = models.UUIDField(_("last event checked"), null=True, blank=True)
    subscriptions = models.JSONField(
        _("subscriptions seen"),
        default=dict,
        blank=True,
        help_text=_(
            "When the relay first saw each subscription wired: events dispatched before "
            "are not resent to it."
        ),
    )
    drained = models.JSONField(
        _("queue seen empty"),
        default=list,
        blank=True,
        help_text=_("When the relay saw the queue empty (ISO times, newest last)."),
    )
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now)

    class Meta:
        verbose_name = _("relay checkpoint")
        verbose_name_plural = _("relay checkpoints")
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} @ {self.dispatched_at.isoformat()}"


class FailureManager(models.Manager["Failure"]):
    def get_queryset(self) -> models.QuerySet[Failure]:
        return super().get_queryset().filter(status=Delivery.Status.FAILED)


class Failure(Delivery):
    """Failed deliveries (a proxy of `Delivery`), for the admin."""

    objects: ClassVar[FailureManager] = FailureManager()

    class Meta:
        proxy = True
        verbose_name = _("failure")
        verbose_name_plural = _("failures")


class IdempotencyKey(models.Model):
    """An inbound call's idempotency key: a retry within the window gets the first event id."""

    event_name = models.CharField(_("event name"), max_length=200)
    key = models.CharField(
        _("key"),
        max_length=255,
        help_text=_("The caller's Idempotency-Key, a payload field, or a signature digest."),
    )
    event_id = models.UUIDField(_("event id"), help_text=_("The event the first call published."))
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    expires_at = models.DateTimeField(
        _("expires at"), help_text=_("After this, the same key publishes a new event.")
    )

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        ordering = ["-created_at"]
        constraints = [
            # Two racing calls with one key: the second insert fails and its publish rolls back.
            models.UniqueConstraint(
                fields=["event_name", "key"], name="django_events_idempotency_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["expires_at"], name="django_events_idem_expires_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.event_name} {self.key}"


class PausedSubscription(models.Model):
    """A paused subscription: its deliveries are held (not run) until it is resumed."""

    subscription = models.CharField(_("subscription"), max_length=255, unique=True)
    paused_at = models.DateTimeField(_("paused at"), default=timezone.now)
    paused_by = models.CharField(
        _("paused by"), max_length=150, blank=True, default="", help_text=_("Who paused it.")
    )

    class Meta:
        verbose_name = _("paused subscription")
        verbose_name_plural = _("paused subscriptions")
        ordering = ["subscription"]

    def __str__(self) -> str:
        return self.subscription


class WebhookEndpoint(models.Model):
    """A webhook receiver registered at run time (the admin): one signed POST per event whose
    name matches one of ``events``, sent by the worker as a ``mode: webhook`` subscription is.

    The signing secret is stored encrypted (``secret_sealed``, a key derived from
    ``SECRET_KEY``): only ``secret_hint`` is ever shown.
    """

    id = models.UUIDField(_("id"), primary_key=True, default=uuid.uuid4, editable=False)
    url = models.URLField(
        _("URL"), max_length=2000, help_text=_("Where each event is POSTed (https://...).")
    )
    events = models.JSONField(
        _("events"),
        default=list,
        help_text=_("Event names or patterns (orders.*, *) this endpoint receives."),
    )
    description = models.CharField(_("description"), max_length=500, blank=True, default="")
    enabled = models.BooleanField(
        _("enabled"), default=True, help_text=_("A disabled endpoint is sent nothing.")
    )
    secret_sealed = models.TextField(
        _("signing secret (encrypted)"), editable=False, default="", blank=True
    )
    secret_hint = models.CharField(
        _("signing secret"),
        max_length=32,
        editable=False,
        default="",
        blank=True,
        help_text=_("The start of the whsec_ secret; the rest is never shown."),
    )
    created_at = models.DateTimeField(_("created at"), default=timezone.now, editable=False)
    updated_at = models.DateTimeField(_("updated at"), default=timezone.now, editable=False)
    failing_since = models.DateTimeField(
        _("failing since"),
        null=True,
        blank=True,
        editable=False,
        help_text=_("First failed attempt since the last success; empty when healthy."),
    )
    disabled_at = models.DateTimeField(_("disabled at"), null=True, blank=True, editable=False)
    disabled_reason = models.TextField(
        _("why disabled"),
        blank=True,
        default="",
        editable=False,
        help_text=_("Set when it was disabled for failing too long (empty: by hand or never)."),
    )

    class Meta:
        verbose_name = _("webhook endpoint")
        verbose_name_plural = _("webhook endpoints")
        ordering = ["-created_at"]
        indexes = [
            # Publishers read the enabled endpoints (cached; see delivery/endpoints.py).
            models.Index(
                fields=["created_at"],
                name="django_events_endpoint_on_idx",
                condition=models.Q(enabled=True),
            ),
        ]

    def __str__(self) -> str:
        # Never a user name or password (an endpoint saved before they were refused).
        return self.description or without_credentials(self.url)

    def clean(self) -> None:
        """Refuse a URL with a user name or password: they would not be sent."""
        if has_credentials(self.url):
            raise ValidationError({"url": CREDENTIALS_REFUSED})


#: Why a webhook URL with ``user:password@`` is refused (the form, ``create_endpoint``).
CREDENTIALS_REFUSED = _(
    "Remove the user name and password from the URL: webhooks do not send them (and the URL "
    "is shown in the admin). The receiver authenticates a webhook by its signature, made "
    "with the signing secret; a token it needs too can go in the URL's path or query."
)


def has_credentials(url: str) -> bool:
    """Whether ``url`` has a user name or password (``https://user:pw@host/``)."""
    return "@" in urlsplit(url).netloc


def without_credentials(url: str) -> str:
    """``url`` with its user name and password (if any) left out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
