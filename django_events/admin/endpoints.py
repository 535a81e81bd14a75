"""The admin of webhook endpoints registered at run time: add, edit, disable, enable again,
and replay (retry its failed deliveries, or deliver a time range's events again).

The signing secret is write-only: a new endpoint's form offers a fresh one to copy to the
receiver before saving; afterwards only its start is shown, and a new one replaces it.
"""

from __future__ import annotations

import logging
import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, router
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from django_events.conf import conf
from django_events.delivery import endpoints, webhooks
from django_events.delivery.pausing import paused_names
from django_events.delivery.recording import event_log_read_alias
from django_events.logs import log_extra
from django_events.models import (
    EventRecord,
    Failure,
    WebhookEndpoint,
    has_credentials,
    without_credentials,
)
from django_events.operations.replay import ReplayError, replay_events
from django_events.operations.retrying import retry_failures
from django_events.operations.timerange import EXAMPLES, parse_range
from django_events.wiring.describing import shown_url
from django_events.wiring.registry import get_registry

logger = logging.getLogger("django_events.admin")

if TYPE_CHECKING:
    WebhookEndpointAdminBase = admin.ModelAdmin[WebhookEndpoint]
else:
    WebhookEndpointAdminBase = admin.ModelAdmin

SEPARATORS = re.compile(r"[\s,]+")


class WebhookEndpointForm(forms.ModelForm):  # type: ignore[type-arg]
    """URL, event patterns, description, enabled; the secret is written, never read back."""

    url = forms.URLField(
        label=_("URL"),
        max_length=2000,
        assume_scheme="https",
        widget=forms.URLInput(attrs={"size": 80}),
    )
    patterns = forms.CharField(
        label=_("Events"),
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text=_(
            "Declared event names or patterns (orders.*, or * for every event), "
            "separated by spaces, commas or new lines."
        ),
    )
    secret = forms.CharField(
        label=_("Signing secret"),
        required=False,
        strip=True,
        widget=forms.TextInput(attrs={"size": 60, "autocomplete": "off"}),
    )

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "patterns", "secret", "description", "enabled")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["url"].help_text = (
            _(
                "Where each event is POSTed: an https:// or http:// URL, of any address "
                "(DJANGO_EVENTS['WEBHOOKS_ALLOW_PRIVATE'] is on)."
            )
            if conf.WEBHOOKS_ALLOW_PRIVATE
            else _("Where each event is POSTed: an https:// URL of a public address.")
        )
        secret = self.fields["secret"]
        if self.instance._state.adding:
            secret.initial = endpoints.new_secret()
            secret.required = True
            secret.help_text = _(
                "Standard Webhooks secret (whsec_ + base64) the receiver verifies with. A new "
                "one is filled in: copy it to the receiver now; once saved, only its start is "
                "shown."
            )
        else:
            self.fields["patterns"].initial = "\n".join(self.instance.events or ())
            if has_credentials(self.instance.url):  # saved before they were refused
                # Not shown: masked, which the URL's check then refuses until removed.
                url = without_credentials(self.instance.url)
                self.initial["url"] = url.replace("://", "://***@", 1)
            secret.widget = forms.PasswordInput(
                render_value=False, attrs={"size": 60, "autocomplete": "new-password"}
            )
            secret.help_text = gettext(
                "Now %(hint)s (the rest is never shown). Leave empty to keep it; enter a new "
                "whsec_ secret to replace it."
            ) % {"hint": self.instance.secret_hint or "-"}

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        url = data.get("url")
        # An endpoint saved before the URL's rules (E327) may be kept disabled as it is: it
        # is sent nothing. Enabled, or given another URL, it must pass them.
        kept = not self.instance._state.adding and url == self.instance.url
        if url and not (kept and not data.get("enabled")):
            try:
                endpoints.check_url(url)  # create_endpoint() applies the same rules
            except forms.ValidationError as exc:
                self.add_error("url", exc)
        return data

    def clean_patterns(self) -> list[str]:
        patterns = [p for p in SEPARATORS.split(self.cleaned_data["patterns"]) if p]
        return endpoints.check_patterns(patterns)  # create_endpoint() applies the same rules

    def clean_secret(self) -> str:
        secret: str = self.cleaned_data.get("secret") or ""
        if secret:
            try:
                webhooks.signing_key_of(secret, prefixed=True)
            except ValueError:
                raise forms.ValidationError(
                    _("A secret is whsec_ followed by base64 (at least one byte).")
                ) from None
        return secret

    def save(self, commit: bool = True) -> WebhookEndpoint:
        endpoint: WebhookEndpoint = super().save(commit=False)
        endpoint.events = self.cleaned_data["patterns"]
        if self.cleaned_data.get("secret"):
            endpoints.set_secret(endpoint, self.cleaned_data["secret"])
        endpoint.updated_at = timezone.now()
        if "enabled" in self.changed_data and endpoint.enabled:  # enabled again by hand
            endpoint.failing_since = endpoint.disabled_at = None
            endpoint.disabled_reason = ""
        elif "enabled" in self.changed_data:
            endpoint.disabled_at, endpoint.disabled_reason = timezone.now(), ""
        if commit:
            endpoint.save()
        return endpoint


def _receives(endpoint: WebhookEndpoint, event_name: str) -> bool:
    return any(fnmatchcase(event_name, p) for p in endpoint.events or () if isinstance(p, str))


class ReplayForm(forms.Form):
    """What to send an endpoint again: its failed deliveries, or a time range's events."""

    what = forms.ChoiceField(
        label=_("Send again"),
        choices=[
            ("failed", _("its failed deliveries (a retry: attempts go on counting)")),
            ("range", _("the stored events it receives that occurred in a time range")),
        ],
        initial="failed",
        widget=forms.RadioSelect,
    )
    since = forms.CharField(label=_("Since"), required=False, help_text=EXAMPLES)
    until = forms.CharField(
        label=_("Until"), required=False, help_text=_("Empty: until now. The same forms.")
    )
    events = forms.MultipleChoiceField(
        label=_("Events"),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=_("Empty: every event it receives."),
    )

    def __init__(self, *args: Any, received: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        events: forms.MultipleChoiceField = self.fields["events"]  # type: ignore[assignment]
        events.choices = [(name, name) for name in received]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("what") != "range":
            return data
        if not data.get("since"):
            self.add_error("since", _("Give the start of the range."))
            return data
        try:
            data["since"], data["until"] = parse_range(data["since"], data.get("until") or None)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc
        return data


def can_replay(request: HttpRequest) -> bool:
    """Replaying needs the change permission on failures (the operators' one, as retrying)."""
    return bool(request.user.has_perm("django_events.change_failure"))


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(WebhookEndpointAdminBase):
    form = WebhookEndpointForm
    list_display = ("shown", "event_list", "state", "secret_hint", "created_at", "failures")
    list_filter = ("enabled",)
    search_fields = ("url", "description")
    actions = ("enable_selected", "disable_selected")
    readonly_fields = (
        "subscription",
        "state",
        "failing_since",
        "disabled_at",
        "disabled_reason",
        "created_at",
        "updated_at",
        "failures",
    )

    class Media:
        css = {"all": ("django_events/admin.css",)}

    def get_urls(self) -> list[URLPattern]:
        replay = path(
            "<path:object_id>/replay/",
            self.admin_site.admin_view(self.replay_view),
            name="django_events_webhookendpoint_replay",
        )
        return [replay, *super().get_urls()]

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {**(extra_context or {}), "can_replay": can_replay(request)}
        return super().change_view(request, object_id, form_url, extra)

    def replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Retry the endpoint's failed deliveries, or deliver a time range's events again."""
        endpoint = self.get_object(request, unquote(object_id))
        if endpoint is None or not self.has_view_permission(request, endpoint):
            raise PermissionDenied  # as the change page does for an object one may not see
        if not can_replay(request):
            raise PermissionDenied
        name = endpoints.subscription_name(endpoint.pk)
        failed = Failure.objects.filter(subscription=name)
        received = [e for e in sorted(get_registry().events) if _receives(endpoint, e)]
        form = ReplayForm(request.POST or None, received=received)
        done = (
            request.method == "POST"
            and form.is_valid()
            and self._replay(request, endpoint, name, failed, form.cleaned_data)
        )
        if done:
            return HttpResponseRedirect(
                reverse("admin:django_events_webhookendpoint_change", args=[endpoint.pk])
            )
        context = {
            **self.admin_site.each_context(request),
            "title": gettext("Replay to %(endpoint)s") % {"endpoint": endpoint},
            "subtitle": None,
            "opts": self.opts,
            "original": endpoint,
            "subscription": name,
            "form": form,
            "failed": failed.count(),
            "received": received,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/django_events/webhookendpoint/replay.html", context)

    def _replay(
        self,
        request: HttpRequest,
        endpoint: WebhookEndpoint,
        name: str,
        failed: QuerySet[Failure],
        data: dict[str, Any],
    ) -> bool:
        """Run the replay the form asks for and say what it did; False: refused (say why)."""
        try:
            if not endpoint.enabled:
                raise ReplayError(f"Webhook endpoint {name!r} is disabled: enable it first")
            if data["what"] == "failed":
                count = failed.count()
                result = retry_failures(failed.using(router.db_for_write(Failure)))
                text = ngettext(
                    "Retried %(count)d failed delivery: %(summary)s",
                    "Retried %(count)d failed deliveries: %(summary)s",
                    count,
                ) % {"count": count, "summary": result.summary()}
            else:
                matched, result = replay_events(
                    name,
                    events=data["events"],
                    since=data["since"],
                    until=data["until"],
                    using=router.db_for_write(EventRecord),
                )
                text = gettext("Replayed %(count)d stored event(s): %(summary)s") % {
                    "count": matched,
                    "summary": result.summary(),
                }
        except ReplayError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return False
        except DatabaseError as exc:
            logger.exception("Replaying to %s failed", name, extra=log_extra(None, name))
            self.message_user(request, f"Replay failed: {exc}", messages.ERROR)
            return False
        self.message_user(request, text, messages.SUCCESS if result.ok else messages.WARNING)
        for reason in result.skipped[:10]:
            self.message_user(request, f"Skipped {reason}", messages.WARNING)
        return True

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        main = (None, {"fields": ("url", "patterns", "secret", "description", "enabled")})
        if obj is None:
            return (main,)
        state = (
            _("Health"),
            {
                "fields": (
                    "subscription",
                    "state",
                    "failing_since",
                    "disabled_at",
                    "disabled_reason",
                    "failures",
                    "created_at",
                    "updated_at",
                )
            },
        )
        return (main, state)

    @admin.display(description=_("endpoint"), ordering="url")
    def shown(self, obj: WebhookEndpoint) -> str:
        where = shown_url(obj.url)  # as events_list and the wiring page show it
        return f"{obj.description} ({where})" if obj.description else where

    @admin.display(description=_("events"))
    def event_list(self, obj: WebhookEndpoint) -> str:
        return ", ".join(obj.events or ())

    @admin.display(description=_("subscription"))
    def subscription(self, obj: WebhookEndpoint) -> str:
        return endpoints.subscription_name(obj.pk)

    @admin.display(description=_("state"), ordering="enabled")
    def state(self, obj: WebhookEndpoint) -> SafeString:
        # Pauses are in the event log, which the routers may keep apart from the endpoints.
        paused = endpoints.subscription_name(obj.pk) in paused_names(event_log_read_alias())
        if obj.enabled and paused:
            return format_html('<span class="de-badge de-pending">{}</span>', _("paused"))
        if not obj.enabled:
            why = _("disabled: failing too long") if obj.disabled_reason else _("disabled")
            return format_html('<span class="de-badge de-failed">{}</span>', why)
        if obj.failing_since is not None:
            since = timezone.localtime(obj.failing_since).strftime("%Y-%m-%d %H:%M")
            text = gettext("failing since %(since)s") % {"since": since}
            return format_html('<span class="de-badge de-pending">{}</span>', text)
        return format_html('<span class="de-badge de-succeeded">{}</span>', _("enabled"))

    @admin.display(description=_("failed deliveries"))
    def failures(self, obj: WebhookEndpoint) -> SafeString:
        url = reverse("admin:django_events_failure_changelist")
        name = endpoints.subscription_name(obj.pk)
        return format_html('<a href="{}?subscription={}">{}</a>', url, name, _("show"))

    @admin.action(description=_("Enable selected (again)"), permissions=["change"])
    def enable_selected(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        # One whose stored URL the rules refuse now (E326, E327) is left, and said why: as
        # its form, which saves it enabled only with a URL they take; each delivery would fail.
        taken = []
        for endpoint in queryset:
            reasons = endpoints.url_refused(endpoint)
            if not reasons:
                taken.append(endpoint)
                continue
            params = {
                "id": endpoint.pk,
                "named": f" ({endpoint.description!r})" if endpoint.description else "",
                "reasons": " ".join(reasons),
            }
            text = (
                gettext(
                    "Webhook endpoint %(id)s%(named)s is enabled, but its URL is refused "
                    "(E327): %(reasons)s Give it another URL on its page, or disable it."
                )
                if endpoint.enabled
                else gettext(
                    "Webhook endpoint %(id)s%(named)s stays disabled: %(reasons)s Give it "
                    "another URL on its page first."
                )
            )
            self.message_user(request, text % params, messages.ERROR)
        if not taken:  # each one refused, and said so
            return
        count = endpoints.enable(taken, using=router.db_for_write(WebhookEndpoint))
        message = ngettext(
            "%(count)d endpoint enabled; retry its failed deliveries from the failures page.",
            "%(count)d endpoints enabled; retry their failed deliveries from the failures page.",
            count,
        ) % {"count": count}
        self.message_user(request, message, messages.SUCCESS)

    @admin.action(description=_("Disable selected"), permissions=["change"])
    def disable_selected(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        count = endpoints.disable(queryset, using=router.db_for_write(WebhookEndpoint))
        message = ngettext(
            "%(count)d endpoint disabled.", "%(count)d endpoints disabled.", count
        ) % {"count": count}
        self.message_user(request, message, messages.SUCCESS)
