"""Sphinx configuration: MyST Markdown pages, the furo theme, warnings are errors in CI."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "django-event-wiring"
author = "django-event-wiring contributors"
copyright = "django-event-wiring contributors"

extensions = ["myst_parser", "manifest_reference"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = "django-event-wiring"
# The manifest schema is served at _static/manifest.schema.json, its published $id.
html_static_path = ["../django_events/schemas"]
