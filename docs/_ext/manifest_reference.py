"""Sphinx extension: the manifest reference, generated from the shipped JSON Schema.

``{manifest-reference}`` in a MyST page expands to one table per object of
``django_events/schemas/manifest.schema.json`` (the top level, an event, a subscription, a
retry policy, ...), so the reference cannot drift from what the loader validates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = (
    Path(__file__).resolve().parents[2] / "django_events" / "schemas" / "manifest.schema.json"
)

# Sections in reading order: (title, JSON pointer of an object schema in the manifest schema).
SECTIONS = [
    ("Top level", ""),
    ("Event declaration", "/$defs/event"),
    ("Subscription declaration", "/$defs/subscription"),
    ("Retry policy", "/$defs/retry"),
    ("Inbound block", "/$defs/inbound"),
]
# Subschemas that constrain an object rather than declare one (if/then of the inbound block).
NOT_DECLARATIONS = ("if", "then", "else", "not", "allOf", "anyOf", "oneOf")


def load_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return data


def resolve(schema: dict[str, Any], pointer: str) -> dict[str, Any]:
    node: Any = schema
    for part in filter(None, pointer.split("/")):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    result: dict[str, Any] = node
    return result


def object_sections(schema: dict[str, Any]) -> list[tuple[str, str]]:
    """Every object with properties in the schema: the known sections, then any other."""
    found = list(SECTIONS)
    known = {pointer for _, pointer in found}

    def walk(node: Any, pointer: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and pointer not in known:
                found.append((pointer.rsplit("/", 1)[-1].replace("_", " ").capitalize(), pointer))
                known.add(pointer)
            for key, value in node.items():
                if key in NOT_DECLARATIONS:
                    continue
                walk(value, f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{pointer}/{index}")

    walk(schema, "")
    return found


def fields(schema: dict[str, Any], pointer: str) -> list[tuple[str, dict[str, Any]]]:
    """The (name, property schema) pairs of one object, in declaration order."""
    return list(resolve(schema, pointer).get("properties", {}).items())


def describe_type(schema: dict[str, Any], prop: dict[str, Any]) -> str:
    """A short human type: enum values, constant, JSON type, pattern and bounds."""
    if "$ref" in prop:
        target = prop["$ref"].removeprefix("#")
        title = {p: t for t, p in object_sections(schema)}.get(target)
        if title:
            return f"object ([{title.lower()}](#{_anchor(title)}))"
        return describe_type(schema, {**resolve(schema, target), **_without(prop, "$ref")})
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " or ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if isinstance(prop.get("additionalProperties"), dict):
        return f"mapping of name to {describe_type(schema, prop['additionalProperties'])}"
    kinds = prop.get("type", "any")
    text = " or ".join(kinds) if isinstance(kinds, list) else kinds
    if "items" in prop:
        text += f" of {describe_type(schema, prop['items'])}"
    if prop.get("pattern") == resolve(schema, "/$defs/dotted_path").get("pattern"):
        text = "dotted path"
    elif "pattern" in prop:
        text += f" matching `{prop['pattern']}`"
    bounds = [
        f"{sign} {prop[key]}"
        for key, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("minLength", "length >="),
            ("maxLength", "length <="),
        )
        if key in prop
    ]
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "\\<").replace("\n", " ")


def render(schema: dict[str, Any] | None = None) -> str:
    """The whole reference as MyST Markdown."""
    schema = schema or load_schema()
    lines: list[str] = []
    for title, pointer in object_sections(schema):
        node = resolve(schema, pointer)
        required = set(node.get("required", ()))
        lines += [f"## {title}", ""]
        if node.get("description"):
            lines += [node["description"], ""]
        if node.get("additionalProperties") is False:
            lines += ["No other keys are allowed.", ""]
        lines += ["| field | type | required | default | meaning |", "|---|---|---|---|---|"]
        for name, prop in fields(schema, pointer):
            target = resolve(schema, prop["$ref"].removeprefix("#")) if "$ref" in prop else {}
            description = prop.get("description") or target.get("description", "")
            default = prop.get("default", target.get("default"))
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{name}`",
                        _cell(describe_type(schema, prop)),
                        "yes" if name in required else "no",
                        "" if default is None else f"`{json.dumps(default)}`",
                        _cell(description),
                    ]
                )
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def setup(app: Any) -> dict[str, Any]:
    from docutils.parsers.rst import Directive
    from docutils.statemachine import StringList

    class ManifestReference(Directive):
        has_content = False

        def run(self) -> list[Any]:
            self.state.document.settings.record_dependencies.add(str(SCHEMA_PATH))
            from docutils import nodes

            container = nodes.container()
            self.state.nested_parse(StringList(render().splitlines()), 0, container)
            return container.children

    app.add_directive("manifest-reference", ManifestReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
