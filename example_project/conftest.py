"""Test set-up of the example shop: a test database of its own per run."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """Name the PostgreSQL test database after this process: runs in parallel never collide."""
    from django.db import connections

    settings_dict = connections["default"].settings_dict
    if settings_dict["ENGINE"].endswith("postgresql"):
        settings_dict["TEST"]["NAME"] = f"test_example_shop_{os.getpid()}"
