"""A project's own authentication, without sessions: the user named in X-Test-User."""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse


class HeaderUserMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        username = request.headers.get("X-Test-User")
        if username:
            request.user = get_user_model().objects.get(username=username)
        return self.get_response(request)
