"""The admin: the event log, failed deliveries with retry, and the wiring page."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, router
from django.db.models import Count, Prefetch, Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from django_events.admin.charts import deliveries_chart, duration_text, durations_chart
from django_events.admin.dashboard import WINDOWS, collect
from django_events.admin.diagram import wiring_svg
from django_events.admin.endpoints import WebhookEndpointAdmin
from django_events.admin.paging import CheapCountPaginator, with_cheap_periods
from django_events.delivery.endpoints import PREFIX, describe, subscription_name
from django_events.exceptions import EventError
from django_events.logs import log_extra
from django_events.models import Delivery, EventRecord, Failure, PausedSubscription, WebhookEndpoint
from django_events.operations.pausing import PauseError, is_paused, pause, resume
from django_events.operations.retrying import mark_resolved, masked_text, retry_failures
from django_events.wiring.describing import EndpointInfo, describe_wiring
from django_events.wiring.listing import retry_text
from django_events.wiring.redaction import mask_values, redact, redact_text
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.admin")

if TYPE_CHECKING:  # the admin classes are generic for type checkers only
    DeliveryInlineBase = admin.TabularInline[Delivery, EventRecord]
    EventRecordAdminBase = admin.ModelAdmin[EventRecord]
    FailureAdminBase = admin.ModelAdmin[Failure]
else:
    DeliveryInlineBase = admin.TabularInline
    EventRecordAdminBase = FailureAdminBase = admin.ModelAdmin

CAUSED_SHOWN = 50
M = TypeVar("M", bound=Delivery | EventRecord)


def _pretty(value: Any) -> SafeString:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    return format_html('<pre class="de-pre">{}</pre>', text)


def _badge(status: str) -> SafeString:
    return format_html('<span class="de-badge de-{}">{}</span>', status, status)


def _redacted(record: EventRecord) -> Any:
    compiled = get_registry().events.get(record.name)
    if compiled is None:  # which keys to redact is unknown: show the keys, not the values
        return mask_values(record.payload)
    return redact(record.payload, compiled.declaration.redact)


def _payload_view(record: EventRecord) -> SafeString:
    """The payload as handlers get it: upcast to the declared version, the stored one below."""
    compiled = get_registry().events.get(record.name)
    if compiled is None or record.version == compiled.version:
        return _pretty(_redacted(record))
    keys = compiled.declaration.redact
    stored = _pretty(_redacted(record))
    try:
        data = compiled.upgrade(record.payload, record.version)
    except EventError as exc:  # NewerVersion, UpcastError: say why, show what is stored
        reason = redact_text(str(exc), record.payload, keys)
        return format_html(
            "<p>{}</p>{}",
            gettext("Stored as version %(v)s: %(r)s") % {"v": record.version, "r": reason},
            stored,
        )
    note = gettext("Upcast from version %(old)s (as stored, below) to version %(new)s") % {
        "old": record.version,
        "new": compiled.version,
    }
    return format_html("<p>{}</p>{}{}", note, _pretty(redact(data, keys)), stored)


def _masked(text: str, delivery: Delivery) -> str:
    """An error or traceback with the event's ``redact`` values masked (handlers quote them),
    as events_list --held masks it."""
    return masked_text(text, delivery.event.name, delivery.event.payload)


def _can_view_log(request: HttpRequest) -> bool:
    user = request.user
    return user.has_perm("django_events.view_eventrecord") or user.has_perm(
        "django_events.change_eventrecord"
    )


def _search(
    queryset: QuerySet[M], search_term: str, prefix_field: str, by_id: Callable[[uuid.UUID], Q]
) -> tuple[QuerySet[M], bool]:
    """A whole UUID looks up ``by_id`` (indexed); other text, the start of ``prefix_field``."""
    term = search_term.strip()
    if not term:
        return queryset, False
    try:
        value = uuid.UUID(term)
    except ValueError:
        return queryset.filter(**{f"{prefix_field}__startswith": term}), False
    return queryset.filter(by_id(value)), False


class RegistryNameFilter(admin.SimpleListFilter):
    """Choices from the registry (no scan of the table for distinct names).

    ``parameter_name`` is also the field filtered on.
    """

    parameter_name: str

    def names(self) -> Iterable[str]:
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(name, name) for name in sorted(self.names())]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(**{self.parameter_name: value}) if value else queryset


class EventNameFilter(RegistryNameFilter):
    """Event names from the registry."""

    title = _("event")
    parameter_name = "name"

    def names(self) -> Iterable[str]:
        return get_registry().events


class SubscriptionFilter(RegistryNameFilter):
    """Subscription names from the registry, and those of the webhook endpoints."""

    title = _("subscription")
    parameter_name = "subscription"

    def names(self) -> Iterable[str]:
        hooks = WebhookEndpoint.objects.values_list("pk", flat=True)
        return [*get_registry().subscriptions, *map(subscription_name, hooks)]


class ReadOnlyMixin:
    """Nothing is added or deleted through the admin; pages show, actions act."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class DeliveryInline(ReadOnlyMixin, DeliveryInlineBase):
    model = Delivery
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = _("deliveries")
    fields = (
        "subscription",
        "mode",
        "status_badge",
        "place",
        "attempts",
        "error",
        "response",
        "updated_at",
        "failure",
    )
    readonly_fields = fields
    ordering = ("subscription",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Delivery]:
        # The event's payload masks the errors' redacted values: one join, not a query a row.
        return super().get_queryset(request).select_related("event").defer("event__headers")

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return _can_view_log(request)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("status"))
    def status_badge(self, obj: Delivery) -> SafeString:
        return _badge(obj.status)

    @admin.display(description=_("key, place in line"))
    def place(self, obj: Delivery) -> str:
        # Ordered subscriptions (ordering_key): a held delivery waits for the lower numbers.
        if obj.sequence is None:
            return ""
        # The key is a payload value, perhaps one the event redacts (ordering_key: email).
        return f"{_masked(obj.ordering_key or '', obj)} #{obj.sequence}"

    @admin.display(description=_("last error"))
    def error(self, obj: Delivery) -> str:
        return _masked(obj.last_error, obj)

    @admin.display(description=_("response"))
    def response(self, obj: Delivery) -> str:
        return _response_summary(obj)

    @admin.display(description="")
    def failure(self, obj: Delivery) -> SafeString | str:
        if obj.status != Delivery.Status.FAILED:
            return ""
        url = reverse("admin:django_events_failure_change", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, _("open the failure"))


class EventLogChangeList(ChangeList):
    """The list page reads neither payloads nor headers, fetches deliveries per page, and
    builds its date hierarchy from the first and last dates only."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        queryset = super().get_queryset(request, exclude_parameters)
        deliveries = Delivery.objects.only("id", "event_id", "subscription", "status")
        return with_cheap_periods(
            queryset.defer("payload", "headers").prefetch_related(
                Prefetch("deliveries", queryset=deliveries.order_by("subscription"))
            )
        )


@admin.register(EventRecord)
class EventRecordAdmin(ReadOnlyMixin, EventRecordAdminBase):
    list_display = ("occurred_at", "name", "short_id", "status_badge", "outcome")
    list_display_links = ("occurred_at", "name")
    list_filter = (EventNameFilter, "status", "occurred_at")
    date_hierarchy = "occurred_at"
    search_fields = ("id",)  # shows the search box; get_search_results does the work
    search_help_text = _("An event id or correlation id (whole UUID), or the start of a name.")
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts would scan the whole table
    paginator = CheapCountPaginator
    list_per_page = 50
    inlines = (DeliveryInline,)
    fieldsets = (
        (None, {"fields": ("id", "name", "status_badge", "occurred_at", "dispatched_at")}),
        (_("Chain"), {"fields": ("correlation", "caused_by", "caused")}),
        (_("Routing"), {"fields": ("awaiting",)}),
        (_("Data"), {"fields": ("payload_pretty", "headers_pretty")}),
    )
    readonly_fields = flatten_fieldsets(fieldsets)  # every field: nothing is edited

    class Media:
        css = {"all": ("django_events/admin.css",)}

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the log is history: view permission shows it, nothing edits it

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[EventLogChangeList]:
        return EventLogChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[EventRecord], search_term: str
    ) -> tuple[QuerySet[EventRecord], bool]:
        return _search(queryset, search_term, "name", lambda v: Q(pk=v) | Q(correlation_id=v))

    def get_urls(self) -> list[URLPattern]:
        wiring = path(
            "wiring/",
            self.admin_site.admin_view(self.wiring_view),
            name="django_events_wiring",
        )
        pausing = path(
            "wiring/pause/",
            self.admin_site.admin_view(self.pause_view),
            name="django_events_wiring_pause",
        )
        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="django_events_dashboard",
        )
        return [wiring, pausing, dashboard, *super().get_urls()]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """Per subscription over the last hour / day / week, and the outbox (view permission)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        names = [name for name, _span in WINDOWS]
        window = request.GET.get("window", "day")
        if window not in names:
            window = "day"
        figures = collect(using=router.db_for_read(Delivery))
        rows = [
            {
                "name": s.name,
                "stats": s.windows[window],
                "p50": duration_text(s.windows[window].p50),
                "p95": duration_text(s.windows[window].p95),
            }
            for s in figures.subscriptions
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": _("Dashboard"),
            "subtitle": None,
            "opts": self.opts,
            "window": window,
            "windows": names,
            "rows": rows,
            "figures": figures,
            "deliveries_chart": deliveries_chart(figures.subscriptions, window),
            "durations_chart": durations_chart(figures.subscriptions, window),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/django_events/dashboard.html", context)

    def pause_view(self, request: HttpRequest) -> HttpResponse:
        """POST ``name`` and ``action`` (pause or resume): the wiring page's buttons."""
        if request.method != "POST" or not can_pause(request):
            raise PermissionDenied
        name, action = request.POST.get("name", ""), request.POST.get("action")
        using = router.db_for_write(PausedSubscription)
        try:
            if action == "pause":
                created = pause(name, by=request.user.get_username(), using=using)
                # What events_pause says: a pause already there is not a new one.
                text = (
                    gettext("Paused '%(name)s'.")
                    if created
                    else gettext("'%(name)s' was already paused.")
                )
                self.message_user(request, text % {"name": name})
            elif action == "resume":
                was_paused = is_paused(name, using=using)
                result = resume(name, using=using)
                level = messages.SUCCESS if result.ok else messages.WARNING
                # What events_resume says: resuming one not paused still delivers what it held.
                text = (
                    gettext("Resumed '%(name)s'. Held deliveries: %(summary)s")
                    if was_paused
                    else gettext("'%(name)s' was not paused. Held deliveries: %(summary)s")
                )
                self.message_user(
                    request, text % {"name": name, "summary": result.summary()}, level
                )
            else:
                raise PermissionDenied
        except PauseError as exc:  # the user's mistake (an unknown or inline name): no traceback
            logger.info("Did not %s %r: %s", action, name, exc, extra=log_extra(None, name))
            self.message_user(request, str(exc), messages.ERROR)
        except DatabaseError as exc:
            logger.warning(
                "Could not %s %r", action, name, exc_info=True, extra=log_extra(None, name)
            )
            self.message_user(request, str(exc), messages.ERROR)
        return HttpResponseRedirect(reverse("admin:django_events_wiring"))

    def wiring_view(self, request: HttpRequest) -> HttpResponse:
        """The read-only wiring page: every event, its schema and its subscriptions."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        found = describe()
        wiring = describe_wiring(endpoints=found)
        state = subscription_state()
        for endpoint in found:
            state.setdefault(endpoint.name, {}).update(_endpoint_state(endpoint, request))
        events = [
            {
                "info": event,
                "schema": json.dumps(event.schema, indent=2, sort_keys=True),
                "subscriptions": [_subscription_row(s, state) for s in event.subscriptions],
            }
            for event in wiring.events
        ]
        context = {
            **self.admin_site.each_context(request),
            "title": _("Wiring"),
            "subtitle": None,
            "opts": self.opts,
            "events": events,
            "unmatched": [_subscription_row(s, state) for s in wiring.unmatched],
            "endpoints": [_subscription_row(e, state) for e in found],
            "endpoints_enabled": sum(1 for e in found if e.enabled),
            "problems": wiring.problems,
            "can_pause": can_pause(request),
            "diagram": wiring_svg(wiring, state),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/django_events/wiring.html", context)

    @admin.display(description=_("event id"))
    def short_id(self, obj: EventRecord) -> str:
        return str(obj.pk)[:8]

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: EventRecord) -> SafeString:
        return _badge(obj.status)

    @admin.display(description=_("deliveries"))
    def outcome(self, obj: EventRecord) -> SafeString | str:
        by_status: dict[str, list[str]] = {}
        for row in obj.deliveries.all():  # prefetched for the whole page
            by_status.setdefault(row.status, []).append(row.subscription)
        if not by_status:
            return "-"
        return format_html_join(
            " ",
            '<span class="de-badge de-{}" title="{}">{} {}</span>',
            (
                (status, ", ".join(names), len(names), status)
                for status, names in sorted(by_status.items())
            ),
        )

    @admin.display(description=_("correlation id"))
    def correlation(self, obj: EventRecord) -> SafeString:
        url = reverse("admin:django_events_eventrecord_changelist")
        return format_html(
            '{} <a href="{}?q={}">{}</a>',
            obj.correlation_id,
            url,
            obj.correlation_id,
            _("every event of this chain"),
        )

    @admin.display(description=_("caused by"))
    def caused_by(self, obj: EventRecord) -> SafeString | str:
        if obj.causation_id is None:
            return gettext("nothing: published outside any handler")
        parent = EventRecord.objects.filter(pk=obj.causation_id).only("id", "name").first()
        if parent is None:
            return format_html("{} ({})", obj.causation_id, _("not stored"))
        return _event_link(parent)

    @admin.display(description=_("caused"))
    def caused(self, obj: EventRecord) -> SafeString | str:
        children = list(
            EventRecord.objects.filter(causation_id=obj.pk)
            .only("id", "name", "occurred_at")
            .order_by("occurred_at")[: CAUSED_SHOWN + 1]
        )
        if not children:
            return gettext("no stored event")
        links = format_html_join(
            "", "<li>{}</li>", ((_event_link(c),) for c in children[:CAUSED_SHOWN])
        )
        more = _("… and more: see the chain") if len(children) > CAUSED_SHOWN else ""
        return format_html('<ul class="de-list">{}</ul>{}', links, more)

    @admin.display(description=_("awaiting an outcome"))
    def awaiting(self, obj: EventRecord) -> SafeString | str:
        """Subscriptions the wiring routes this event to that have recorded nothing yet."""
        compiled = get_registry().events.get(obj.name)
        if compiled is None:
            return gettext("the event is no longer declared")
        recorded = set(obj.deliveries.values_list("subscription", flat=True))
        waiting = [
            s
            for s in (*compiled.sync, *compiled.async_, *compiled.tasks)
            if s.name not in recorded and (s.accepts is None or s.accepts(obj.payload))
        ]
        if not waiting:
            return gettext("nothing: every subscription recorded an outcome")
        return format_html_join(
            ", ",
            "{} ({})",
            ((s.name, f"{s.mode}, queue {s.queue}" if s.is_queued else s.mode) for s in waiting),
        )

    @admin.display(description=_("payload"))
    def payload_pretty(self, obj: EventRecord) -> SafeString:
        return _payload_view(obj)

    @admin.display(description=_("headers"))
    def headers_pretty(self, obj: EventRecord) -> SafeString:
        return _pretty(obj.headers)


def _event_link(record: EventRecord) -> SafeString:
    url = reverse("admin:django_events_eventrecord_change", args=[record.pk])
    return format_html('<a href="{}">{}</a> <code>{}</code>', url, record.name, record.pk)


def _subscription_row(info: Any, state: dict[str, dict[str, Any]]) -> dict[str, Any]:
    when = getattr(info, "when", None)
    return {
        "info": info,
        "when": json.dumps(when, sort_keys=True) if when is not None else "",
        "retry": retry_text(info.retry),
        **state.get(info.name, {}),
    }


def _endpoint_state(endpoint: EndpointInfo, request: HttpRequest) -> dict[str, Any]:
    """What the wiring page shows of an endpoint besides its pause: its state (where a
    subscription shows "active") and a link to its admin page."""
    health, badge, note = endpoint.state, "succeeded", ""
    if not endpoint.enabled:  # "disabled", or "disabled: failing too long"
        health, _, note = endpoint.state.partition(": ")
        badge = "failed"
    elif endpoint.failing_since is not None:
        since = timezone.localtime(endpoint.failing_since).strftime("%Y-%m-%d %H:%M")
        health, badge, note = gettext("failing"), "pending", gettext("since %s") % since
    user = request.user
    can_open = user.has_perm("django_events.view_webhookendpoint") or user.has_perm(
        "django_events.change_webhookendpoint"
    )
    page = reverse(
        "admin:django_events_webhookendpoint_change", args=[endpoint.name.removeprefix(PREFIX)]
    )
    return {
        "health": health,
        "health_badge": badge,
        "health_note": note,
        "endpoint_page": page if can_open else "",
    }


def can_pause(request: HttpRequest) -> bool:
    """Pausing and resuming need the change permission on failures (the operators' one)."""
    return bool(request.user.has_perm("django_events.change_failure"))


def subscription_state() -> dict[str, dict[str, Any]]:
    """Per subscription name: ``paused`` (bool), ``held`` and ``failed`` (counts)."""
    state: dict[str, dict[str, Any]] = {}
    for name in PausedSubscription.objects.values_list("subscription", flat=True):
        state.setdefault(name, {})["paused"] = True
    # Two index scans on (subscription, status): cheap however large the table.
    counts = (
        Delivery.objects.filter(status__in=[Delivery.Status.HELD, Delivery.Status.FAILED])
        .values_list("subscription", "status")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for name, status, n in counts:
        state.setdefault(name, {})[status] = n
    return state


@admin.register(Failure)
class FailureAdmin(ReadOnlyMixin, FailureAdminBase):
    list_display = ("updated_at", "subscription", "event_link", "mode", "attempts", "error")
    list_filter = (SubscriptionFilter, "mode", "updated_at")
    search_fields = ("subscription",)
    search_help_text = _("An event id (whole UUID), or the start of a subscription name.")
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER  # facet counts would scan the whole table
    paginator = CheapCountPaginator
    list_per_page = 50
    actions = ("retry_selected", "resolve_selected")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "subscription",
                    "event_link",
                    "mode",
                    "status_badge",
                    "attempts",
                    "uncounted",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (_("Error"), {"fields": ("last_error_pre", "traceback_pre")}),
        (_("Response"), {"fields": ("response_summary", "response_body_pre")}),
        (_("Event"), {"fields": ("payload_pretty",)}),
    )
    readonly_fields = flatten_fieldsets(fieldsets)  # every field: nothing is edited

    class Media:
        css = {"all": ("django_events/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Failure]:
        return super().get_queryset(request).select_related("event").defer("event__headers")

    def get_model_perms(self, request: HttpRequest) -> dict[str, bool]:
        # The change permission runs the actions; the pages edit nothing, so the admin index
        # offers "View", not "Change".
        perms = super().get_model_perms(request)
        return {**perms, "view": perms["view"] or perms["change"], "change": False}

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> Any:
        return FailureChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Failure], search_term: str
    ) -> tuple[QuerySet[Failure], bool]:
        return _search(queryset, search_term, "subscription", lambda v: Q(event_id=v))

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Every field is read-only: the page acts through its Retry / Mark resolved buttons.
        # A save would write back the row as read, over a concurrent retry's claim.
        if request.method == "POST":
            raise PermissionDenied
        extra = {
            **(extra_context or {}),
            "title": _("Failed delivery"),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            "show_delete": False,
            "can_act": self.has_change_permission(request),
            "de_actions": [
                ("retry_selected", _("Retry")),
                ("resolve_selected", _("Mark resolved")),
            ],
        }
        return super().changeform_view(request, object_id, form_url, extra)

    @admin.action(description=_("Retry selected"), permissions=["change"])
    def retry_selected(self, request: HttpRequest, queryset: QuerySet[Failure]) -> None:
        try:
            # Claimed and written where the router writes (the list may read a replica).
            result = retry_failures(queryset.using(router.db_for_write(Failure)))
        except DatabaseError as exc:
            logger.exception("Retrying failed deliveries failed", extra=log_extra())
            self.message_user(request, f"Retry failed: {exc}", messages.ERROR)
            return
        level = messages.SUCCESS if result.ok else messages.WARNING
        self.message_user(request, f"Retried: {result.summary()}", level)
        for reason in result.skipped[:10]:
            self.message_user(request, f"Skipped {reason}", messages.WARNING)

    @admin.action(description=_("Mark resolved"), permissions=["change"])
    def resolve_selected(self, request: HttpRequest, queryset: QuerySet[Failure]) -> None:
        # Resolved, and an ordered key handed on, where the router writes (the list may read
        # a replica), as "Retry selected" claims.
        count = mark_resolved(queryset.using(router.db_for_write(Failure)))
        message = ngettext(
            "%(count)d failed delivery marked resolved.",
            "%(count)d failed deliveries marked resolved.",
            count,
        ) % {"count": count}
        self.message_user(request, message, messages.SUCCESS)

    @admin.display(description=_("event"), ordering="event__occurred_at")
    def event_link(self, obj: Failure) -> SafeString:
        return _event_link(obj.event)

    @admin.display(description=_("status"))
    def status_badge(self, obj: Failure) -> SafeString:
        return _badge(obj.status)

    @admin.display(description=_("last error"))
    def error(self, obj: Failure) -> str:
        text = _masked(obj.last_error, obj)
        first = text.splitlines()[0] if text else ""
        return first if len(first) <= 120 else first[:119] + "…"

    @admin.display(description=_("webhook answer"))
    def response_summary(self, obj: Failure) -> str:
        return _response_summary(obj) or "-"

    @admin.display(description=_("response body (first KB)"))
    def response_body_pre(self, obj: Failure) -> SafeString:
        return format_html('<pre class="de-pre">{}</pre>', _masked(obj.response_body, obj))

    @admin.display(description=_("last error"))
    def last_error_pre(self, obj: Failure) -> SafeString:
        return format_html('<pre class="de-pre">{}</pre>', _masked(obj.last_error, obj))

    @admin.display(description=_("traceback"))
    def traceback_pre(self, obj: Failure) -> SafeString:
        text = _masked(obj.traceback, obj)
        return format_html('<pre class="de-pre de-traceback">{}</pre>', text or "-")

    @admin.display(description=_("payload"))
    def payload_pretty(self, obj: Failure) -> SafeString:
        return _payload_view(obj.event)


class FailureChangeList(ChangeList):
    """The list page reads no traceback (the payload masks the errors' redacted values)."""

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        queryset = super().get_queryset(request, exclude_parameters)
        return queryset.defer("traceback")


__all__ = ["EventRecordAdmin", "FailureAdmin", "WebhookEndpointAdmin"]


def _response_summary(obj: Delivery) -> str:
    """A webhook's last answer, ``HTTP 200 in 12 ms``; empty for other deliveries."""
    if obj.response_ms is None:
        return ""
    status = f"HTTP {obj.response_status}" if obj.response_status else _("no answer")
    return f"{status} in {obj.response_ms} ms"
