"""Everything a user can set, run or declare is documented.

Each test names what is missing and where to document it, so a new setting, command or
manifest field fails here until its documentation exists.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType

from django_events.conf import DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMANDS = ROOT / "django_events" / "management" / "commands"


def reference_generator() -> ModuleType:
    """The Sphinx extension that renders docs/manifest.md from the shipped schema."""
    spec = importlib.util.spec_from_file_location(
        "manifest_reference", DOCS / "_ext" / "manifest_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_keys(markdown: str) -> set[str]:
    """The backquoted names in the first column of every Markdown table row."""
    return set(re.findall(r"^\|\s*`([^`]+)`\s*\|", markdown, flags=re.MULTILINE))


def test_every_setting_key_is_documented() -> None:
    page = DOCS / "configuration.md"
    missing = sorted(set(DEFAULTS) - table_keys(page.read_text(encoding="utf-8")))

    assert not missing, (
        f"DJANGO_EVENTS key(s) {missing} (django_events/conf.py DEFAULTS) are not documented: "
        f"add a row `| `KEY` | type | default | meaning |` to the settings table of {page}"
    )


def test_every_management_command_is_documented() -> None:
    page = DOCS / "commands.md"
    commands = {p.stem for p in COMMANDS.glob("*.py") if not p.stem.startswith("_")}
    headings = set(re.findall(r"^##\s+`([a-z_]+)`", page.read_text(encoding="utf-8"), re.M))
    missing = sorted(commands - headings)

    assert commands, f"no management commands found in {COMMANDS}"
    assert not missing, (
        f"management command(s) {missing} are not documented: add a section "
        f"'## `NAME`' (what it does, its options, its exit status) to {page}"
    )


def test_every_manifest_field_has_a_description_in_the_generated_reference() -> None:
    generator = reference_generator()
    schema = generator.load_schema()
    undescribed = []
    for _, pointer in generator.object_sections(schema):
        for name, prop in generator.fields(schema, pointer):
            target = generator.resolve(schema, prop["$ref"][1:]) if "$ref" in prop else {}
            if not (prop.get("description") or target.get("description")):
                undescribed.append(f"{pointer or '/'}/properties/{name}")

    assert not undescribed, (
        f"manifest field(s) {undescribed} have no 'description' in "
        "django_events/schemas/manifest.schema.json; docs/manifest.md is generated from it"
    )


def test_generated_reference_lists_every_field_of_every_declaration() -> None:
    generator = reference_generator()
    schema = generator.load_schema()
    rendered = generator.render(schema)
    titles = re.findall(r"^## (.+)$", rendered, flags=re.MULTILINE)

    assert titles[:4] == [
        "Top level",
        "Event declaration",
        "Subscription declaration",
        "Retry policy",
    ]
    for title, pointer in generator.object_sections(schema):
        section = rendered.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
        assert table_keys(section) == {name for name, _ in generator.fields(schema, pointer)}
    modes = '`"inline"` or `"sync"` or `"async"` or `"webhook"`'
    assert f'| `mode` | {modes} | no | `"sync"` |' in rendered
    assert "| `handler` | dotted path | no |" in rendered  # mode: webhook has none
    assert "| `version` | `1` | yes |" in rendered
    assert "docs/manifest.md" not in rendered
    assert "{manifest-reference}" in (DOCS / "manifest.md").read_text(encoding="utf-8")


# Build outputs, caches and environments: not the repository's files (.gitignore).
NOT_THE_REPOSITORY = {".git", ".tox", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
NOT_THE_REPOSITORY |= {".hypothesis", "_build", "var", "build", "dist", "node_modules"}


def repository_files() -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [
            name
            for name in subfolders
            if name not in NOT_THE_REPOSITORY
            and not name.startswith(".venv")
            and not name.endswith(".egg-info")
        ]
        files.extend(Path(folder) / name for name in names if name != ".git")  # a worktree's
    return files


def test_no_file_cites_a_document_outside_the_repository() -> None:
    """The docs stand alone: a design document the repository does not hold is no reference."""
    # Spelled in two halves, so that this file does not cite it either.
    cited = [("DESIGN" + " section").encode(), ("DESIGN" + ".md").encode()]
    files = repository_files()
    offending = sorted(
        str(path.relative_to(ROOT)) for path in files if any(c in path.read_bytes() for c in cited)
    )

    assert not offending, f"{offending} cite a document outside the repository: cite docs/ pages"
    assert ROOT / "docs" / "contributing.md" in files  # where the servers and commands are


def test_every_db_worker_command_line_of_the_docs_passes_no_reload() -> None:
    # Under DEBUG, db_worker's autoreloader (its --reload default) ends the worker process
    # on a second Ctrl+C without the SystemExit the docs describe: the task stays RUNNING.
    pages = [*sorted(DOCS.glob("*.md")), ROOT / "README.md", ROOT / "example_project" / "README.md"]
    commands = [
        (page, line.strip())
        for page in pages
        for line in page.read_text(encoding="utf-8").splitlines()
        if re.search(r"python manage\.py db_worker\b", line)
    ]
    lines = [
        f"{page.relative_to(ROOT)}: {line}" for page, line in commands if "--no-reload" not in line
    ]
    assert lines == [], "Add --no-reload to these db_worker command lines"
    assert any(page.parent.name == "example_project" for page, _ in commands)
