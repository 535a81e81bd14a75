"""Load and validate manifests (YAML files and the settings' EVENTS / SUBSCRIPTIONS)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match

from django_events.wiring.declarations import (
    EventDeclaration,
    Origin,
    Problem,
    SourceDeclaration,
    SubscriptionDeclaration,
)
from django_events.wiring.redaction import MASK, error_message

JsonPath = tuple[str | int, ...]
OriginFor = Callable[[JsonPath], Origin]


@dataclass
class Manifest:
    """What one source declares, plus the problems found while reading it."""

    events: list[EventDeclaration] = field(default_factory=list)
    subscriptions: list[SubscriptionDeclaration] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sources: list[SourceDeclaration] = field(default_factory=list)
    #: Events declared here but left out for a schema error (E103): not "undeclared" (E105).
    left_out: list[str] = field(default_factory=list)

    @property
    def rejected(self) -> bool:
        """Whether it does not match the schema (E103): then none of it is used, and its
        declarations that match are there for the checks only."""
        return any(p.id == "django_events.E103" for p in self.problems)


@cache
def manifest_schema() -> dict[str, Any]:
    """Return the JSON Schema that manifests are validated against."""
    text = resources.files("django_events").joinpath("schemas/manifest.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _manifest_validator() -> Draft202012Validator:
    return Draft202012Validator(manifest_schema())


def format_path(path: Iterable[str | int]) -> str:
    """Render a JSON path as ``$.events['a.b'].schema`` style text."""
    out = "$"
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += f"[{part!r}]"
    return out


Duplicate = tuple[JsonPath, int, int]  # path of the repeated key, first line, repeated line


def _node_lines(
    node: yaml.Node, path: JsonPath, lines: dict[JsonPath, int], duplicates: list[Duplicate]
) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:  # YAML keeps the last silently; a manifest must not
                duplicates.append(((*path, key), seen[key], line))
            seen[key] = line
            _node_lines(value_node, (*path, key), lines, duplicates)
            lines[(*path, key)] = line
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, (*path, index), lines, duplicates)


def _line_lookup(lines: dict[JsonPath, int]) -> Callable[[JsonPath], int | None]:
    def line_of(path: JsonPath) -> int | None:
        for end in range(len(path), -1, -1):
            line = lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return None

    return line_of


def load_manifest(path: Path) -> Manifest:
    """Read one YAML manifest; every problem carries the file and 1-based line."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Manifest(problems=[_missing(path)])
    except OSError as exc:
        return Manifest(
            problems=[
                _problem(
                    "E101",
                    f"Manifest file {file!r} cannot be read: {exc}",
                    None,
                    Origin("manifest", file),
                )
            ]
        )
    try:
        root, data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        line, reason, hint = _yaml_failure(exc, text)
        return Manifest(
            problems=[
                _problem(
                    "E102", f"YAML syntax error: {reason}", hint, Origin("manifest", file, line)
                )
            ]
        )
    lines: dict[JsonPath, int] = {}
    duplicates: list[Duplicate] = []
    if root is not None:
        _node_lines(root, (), lines, duplicates)
    line_of = _line_lookup(lines)
    if data is None:  # nothing but blank lines and comments: say so, not "'version' required"
        return Manifest(
            problems=[
                _problem(
                    "E103",
                    "The manifest is empty: it needs at least 'version: 1'",
                    "Write version: 1 in it (then events: and subscriptions:), or remove it "
                    "from DJANGO_EVENTS['MANIFESTS'].",
                    Origin("manifest", file),
                )
            ]
        )

    def origin_for(json_path: JsonPath) -> Origin:
        return Origin("manifest", file, line_of(json_path))

    manifest = parse_manifest_data(data, origin_for)
    manifest.problems[:0] = [_duplicate(file, *d) for d in duplicates]
    return manifest


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's nodes (for the lines) and its data, parsed once: the data is built
    from the same nodes, as ``yaml.safe_load`` builds it."""
    loader = yaml.SafeLoader(text)  # raises ReaderError for a character YAML refuses
    try:
        root = loader.get_single_node()
        return root, None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()


def _yaml_failure(exc: yaml.YAMLError, text: str) -> tuple[int | None, str, str]:
    """The 1-based line, the reason and the hint of E102 for a YAML error."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML refuses, anywhere
        return (
            text.count("\n", 0, exc.position) + 1,  # the reader gives an offset, not a line
            f"unacceptable character #x{exc.character:04x}: {exc.reason}",
            "Remove the character at that line (a control character pasted with the text): "
            "the file is ignored until then.",
        )
    mark = getattr(exc, "problem_mark", None)
    reason = getattr(exc, "problem", None) or str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:  # e.g. where an unclosed quote started
        reason += f" ({context} at line {context_mark.line + 1})"
    line = mark.line + 1 if mark is not None else None
    return line, reason, "Fix the YAML at that line: the file is ignored until then."


def _missing(path: Path) -> Problem:
    """E101 for a file that does not exist; a relative path says where it was looked for."""
    file = str(path)
    if path.is_absolute():
        message, hint = (
            f"Manifest file {file!r} does not exist.",
            "Fix the path in DJANGO_EVENTS['MANIFESTS'].",
        )
    else:
        message = (
            f"Manifest file {file!r} does not exist (relative paths are looked up in the "
            f"working directory, {os.getcwd()!r})"
        )
        hint = (
            f'Make it absolute, as BASE_DIR / "{path.as_posix()}" in '
            "DJANGO_EVENTS['MANIFESTS']: the working directory depends on where the process "
            "starts."
        )
    return _problem("E101", message, hint, Origin("manifest", file))


def _duplicate(file: str, path: JsonPath, first: int, line: int) -> Problem:
    origin = Origin("manifest", file, line)
    key = _key_shown(path[-1])  # a secret or url pasted as a key, twice
    if len(path) == 2 and path[0] == "events":
        return _problem(
            "E106",
            f"Event {path[1]!r} is declared twice (also at {file}:{first})",
            "Keep one declaration; names are global.",
            origin,
        )
    return _problem(
        "E102",
        f"YAML syntax error: duplicate key {key!r} at "
        f"{_shown_path((*path[:-1], key))} (first at line {first})",
        "Remove one of them: until then the last one is used, as YAML does.",
        origin,
    )


def parse_settings(events: Any, subscriptions: Any) -> Manifest:
    """Read the EVENTS and SUBSCRIPTIONS settings as if they were one manifest."""

    def origin_for(json_path: JsonPath) -> Origin:
        # Never the root: it is built here, version and all; only its two values can be wrong.
        key = "EVENTS" if json_path[0] == "events" else "SUBSCRIPTIONS"
        return Origin(
            "settings",
            f"settings.DJANGO_EVENTS[{key!r}]" + "".join(f"[{p!r}]" for p in json_path[1:2]),
        )

    return parse_manifest_data(
        {"version": 1, "events": events, "subscriptions": subscriptions}, origin_for
    )


def parse_manifest_data(data: Any, origin_for: OriginFor) -> Manifest:
    """Validate ``data`` against the manifest schema and build declarations.

    Every schema error is reported (E103). The declarations without one are still built,
    for the checks to report their own problems in the same run (the registry uses none of
    a rejected manifest's declarations). An error in the file as a whole (not a mapping, no
    or another ``version``) builds nothing; one in a section's shape, nothing of the section.
    """
    errors = _deepest(list(_manifest_validator().iter_errors(data)))
    hidden = _hidden_paths(data)
    located = [
        (origin_for(path), path, message)
        for path, message in (_locate(error, hidden) for error in errors)
    ]
    located.sort(key=lambda opm: (opm[0].line or 0, [*map(str, opm[1])]))
    manifest = Manifest(
        problems=[
            _problem(
                "E103",
                f"{_shown_path(path)}: {message}",
                _hint(path, message),
                origin,
            )
            for origin, path, message in located
        ]
    )
    # Where the errors are: () the file, ("events",) a section (or a key at the top that is
    # none), ("events", name) a declaration.
    broken = {path[:2] for _, path, _ in located}
    if any(len(where) == 0 or where[0] == "version" for where in broken):
        return manifest
    for name, body in _section(data, "events", broken):
        if ("events", name) in broken:
            manifest.left_out.append(name)
            continue
        origin = origin_for(("events", name))
        manifest.events.append(_event(name, body or {}, origin, manifest.problems))
    for index, body in _section(data, "subscriptions", broken):
        if ("subscriptions", index) not in broken:
            origin = origin_for(("subscriptions", index))
            manifest.subscriptions.append(_subscription(body, origin))
    for name, body in _section(data, "sources", broken):
        if ("sources", name) not in broken:
            manifest.sources.append(_source(name, body, origin_for(("sources", name))))
    return manifest


def _section(data: dict[str, Any], key: str, broken: set[JsonPath]) -> Iterable[tuple[Any, Any]]:
    """The (name or index, body) pairs of a section whose shape the schema accepted."""
    if (key,) in broken:
        return []
    section = data.get(key) or {}
    return enumerate(section) if isinstance(section, list) else section.items()


def _deepest(errors: Sequence[ValidationError]) -> list[ValidationError]:
    # An anyOf/oneOf failure reports the parent; its most specific child says more.
    return [best_match(error.context) or error if error.context else error for error in errors]


SECRET_HINT = (
    "Give the NAME of the setting or environment variable that holds the secret (upper "
    "case), never the secret itself."
)

# The value is masked (a token may be in its path or query): say what the schema accepts.
URL_HINT = (
    "A literal url must start with https://; put another (an http:// receiver under "
    "WEBHOOKS_ALLOW_PRIVATE) in a setting or environment variable and give its NAME."
)


HIDDEN_KEY_HINT = (
    "A key that may hold a secret or a url is masked: remove it, or write one of the keys "
    "of the manifest reference in the docs (with a space after the colon)."
)


def _hint(path: JsonPath, message: str) -> str:
    run_together = re.search(rf"'(?P<name>[A-Za-z_][\w-]*)[^'\w-]+{MASK}'", message)
    if run_together:  # `_key_shown`: a key and its value with no space between them
        name = run_together["name"].lower()
        if name in _schema_keys():
            space = f"Write '{name}: <value>', with a space after the colon."
            return f"{space} {SECRET_HINT}" if name == "secret" else space
    if run_together or re.search(rf"'{MASK}',? .*unexpected\)$", message):
        return HIDDEN_KEY_HINT
    if not message.startswith(repr(MASK)):  # a bad key, not a bad value
        return "See the manifest reference in the docs."
    if path[-1:] == ("secret",):
        return SECRET_HINT
    if path[:1] == ("subscriptions",) and path[-1:] == ("url",):
        return URL_HINT
    return "See the manifest reference in the docs."


# Where each section keeps the values E103 never quotes, below each of its items.
HIDDEN_IN_ITEMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "subscriptions": (("secret",), ("url",)),
    "events": (("inbound", "secret"),),
    "sources": (("secret",),),
}


def _hidden_paths(data: Any) -> list[tuple[str, ...]]:
    """The keys whose values an E103 message never quotes (as `redaction.error_message`
    masks a payload's): a ``secret`` may be the secret itself, typed by mistake where its
    name belongs, and a literal webhook ``url`` may carry a token in its path or query.
    Check output ends up in CI logs. A section in the wrong shape (a mapping of names where
    a list belongs, or the reverse) is quoted whole: its items' values are found either way."""
    paths: list[tuple[str, ...]] = []
    for section, inner in HIDDEN_IN_ITEMS.items():
        declared = data.get(section) if isinstance(data, dict) else None
        if isinstance(declared, dict):  # items by name (for subscriptions, or one item)
            names = [name for name in declared if isinstance(name, str)]
            paths += [(section, name, *keys) for name in names for keys in inner]
        if not isinstance(declared, dict) or section == "subscriptions":
            # A list's items: list indexes drop out of the paths.
            paths += [(section, *keys) for keys in inner]
    return paths


# A key that is a name, a separator and a value: `{secret:hunter2}` and `{url:https://...}` in
# a YAML flow mapping (no space after the colon) are one key, the value in it.
_KEY_WITH_VALUE = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(?P<sep>\s*[:=]\s*|\s+)(?P<value>\S.*)$")
# What an unexpected key reads like when it is a misspelt or misplaced key, not a value.
_KEY_LIKE = re.compile(r"^[A-Za-z_][A-Za-z_.-]{0,39}$")
# Run together with such a name (in any case), a value is masked whatever it looks like.
_SECRET_WORDS = ("secret", "token", "password", "url", "authorization", "api_key", "apikey")


@cache
def _schema_keys() -> frozenset[str]:
    """Every key the schema knows, for the hint of a key run together with its value."""
    schema = manifest_schema()
    bodies = [schema, *schema["$defs"].values()]
    return frozenset(key for body in bodies for key in body.get("properties", {}))


def _key_shown(key: Any) -> Any:
    """An unexpected ``key`` as E103 may quote it. A secret or a webhook url pasted as a key,
    or run together with its key (in any case) as one, is masked, as is any key holding a
    url (a token may be in its path or query) or that does not read like a key: check output
    ends up in CI logs. A misspelt key (``handlr``, ``queue:billing``) is quoted whole."""
    if not isinstance(key, str):
        return key
    found = _KEY_WITH_VALUE.match(key)
    if found is None or found["value"].startswith("//"):  # a bare key, or a url
        secret = key.lower().startswith("whsec_")  # a webhook secret, even one of letters only
        return key if _KEY_LIKE.match(key) and not secret else MASK
    name = found["name"]
    if any(word in name.lower() for word in _SECRET_WORDS) or not _plain(found["value"]):
        return f"{name}{found['sep']}{MASK}"
    return key


def _plain(value: str) -> bool:
    """Whether a value run together with its key reads like a word, a dotted path or a
    number (``billing``, ``tests.app.handlers.record``, ``5``), not like a secret or a url."""
    return _KEY_LIKE.match(value) is not None or value.replace(".", "", 1).isdigit()


def _urls_in(value: Any) -> set[str]:
    """The strings in ``value`` (keys included) that hold a url, which E103 never quotes."""
    if isinstance(value, dict):
        return {*_urls_in(list(value)), *_urls_in(list(value.values()))}
    if isinstance(value, list):
        return {text for item in value for text in _urls_in(item)}
    return {value} if isinstance(value, str) and "://" in value else set()


def _without_urls(message: str, instance: Any) -> str:
    for url in _urls_in(instance):
        message = message.replace(repr(url), repr(MASK))
    return message


def _shown_path(path: JsonPath) -> str:
    """``format_path(path)`` for a problem's message: a key holding a url is masked."""
    return format_path(MASK if isinstance(p, str) and "://" in p else p for p in path)


def _locate(error: ValidationError, hidden: Sequence[tuple[str, ...]]) -> tuple[JsonPath, str]:
    """The path of the offending key (its line is reported) and the message to show, with
    the values at ``hidden`` paths masked."""
    path: JsonPath = tuple(error.absolute_path)
    instance, value = error.instance, error.validator_value
    if "propertyNames" in error.relative_schema_path:  # a bad key: point at the key itself
        return (*path, str(instance)), _without_urls(error.message, instance)
    if error.validator == "additionalProperties" and value is False and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        patterns = schema.get("patternProperties", {})
        extra = [
            k
            for k in instance
            if k not in schema.get("properties", {})
            and not any(re.search(p, str(k)) for p in patterns)
        ]
        if extra:
            shown = {key: _key_shown(key) for key in extra}
            if all(shown[key] == key for key in extra):
                return (*path, extra[0]), error.message
            message = error.message
            for key in extra:
                message = message.replace(repr(key), repr(shown[key]))
            return path, message  # the block's line: its key's path would quote the value
    if error.validator == "not" and isinstance(value, dict) and isinstance(instance, dict):
        exclusive = value.get("required", [])
        given = [k for k in instance if k in exclusive]
        if len(given) > 1:
            names = " and ".join(repr(k) for k in exclusive)
            return (*path, given[-1]), f"{names} cannot both be given; use one of them"
        if len(exclusive) == 1 and given:  # a key some other key's value rules out
            mode = f" with mode: {instance['mode']}" if "mode" in instance else ""
            return (*path, given[0]), f"{given[0]!r} is not allowed{mode}"
    return path, _without_urls(error_message(error, hidden), instance)


def _event(
    name: str, body: dict[str, Any], origin: Origin, problems: list[Problem]
) -> EventDeclaration:
    upcast: dict[int, str] = {}
    for key, path in (body.get("upcast") or {}).items():
        # YAML reads `1:` as an int, JSON and settings may say "1"; True or 1.5 are neither.
        if isinstance(key, int) and not isinstance(key, bool):
            upcast[key] = path
        elif isinstance(key, str) and key.isdigit():
            upcast[int(key)] = path
        else:
            problems.append(
                _problem(
                    "E130",
                    f"Event {name!r}: upcast key {key!r} is not a version number",
                    "Key each upcaster by the version it upgrades from (1, 2, ...).",
                    origin,
                )
            )
    return EventDeclaration(
        name=name,
        origin=origin,
        description=body.get("description", ""),
        schema=body.get("schema"),
        type_path=body.get("type"),
        durable=body.get("durable", True),
        redact=tuple(body.get("redact", ())),
        record=body.get("record"),
        inbound=body.get("inbound"),
        version=body.get("version", 1),
        upcast=upcast,
    )


def _subscription(body: dict[str, Any], origin: Origin) -> SubscriptionDeclaration:
    event, handler = body["event"], body.get("handler", "")
    target = handler or f"webhook:{body.get('url', '')}"  # mode: webhook has no handler
    return SubscriptionDeclaration(
        name=body.get("name") or f"{event}:{target}",
        event=event,
        handler=handler,
        origin=origin,
        mode=body.get("mode", "sync"),
        queue=body.get("queue"),
        when=body.get("when"),
        retry=body.get("retry"),
        broadcast=body.get("broadcast", False),
        idempotent=body.get("idempotent", False),
        timeout=body.get("timeout"),
        via=body.get("via"),
        give_up_after=body.get("give_up_after"),
        ordering_key=body.get("ordering_key"),
        url=body.get("url"),
        secret=body.get("secret"),
        format=body.get("format", "standard-webhooks"),
    )


def _source(name: str, body: dict[str, Any], origin: Origin) -> SourceDeclaration:
    return SourceDeclaration(
        name=name,
        origin=origin,
        auth=body["auth"],
        secret=body.get("secret"),
        type=body.get("type"),
        events=dict(body.get("events") or {}),
        idempotency=body.get("idempotency"),
        idempotency_retention=body.get("idempotency_retention"),
        tolerance=body.get("tolerance"),
        max_body=body.get("max_body"),
        payload=body.get("payload"),
        options=tuple(body),
    )


def _problem(code: str, message: str, hint: str | None, origin: Origin) -> Problem:
    return Problem(f"django_events.{code}", message, hint, origin)
