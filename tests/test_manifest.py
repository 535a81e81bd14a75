"""Loading YAML manifests and the EVENTS / SUBSCRIPTIONS settings: declarations or problems."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from django.conf import settings

from django_events.wiring.declarations import (
    EventDeclaration,
    Origin,
    Problem,
    SubscriptionDeclaration,
)
from django_events.wiring.manifest import Manifest, load_manifest, manifest_schema, parse_settings
from django_events.wiring.registry import get_registry

from .conftest import wiring

HINT = "See the manifest reference in the docs."


def write(tmp_path: Path, text: str, name: str = "events.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> tuple[Path, Manifest]:
    path = write(tmp_path, text)
    return path, load_manifest(path)


def summary(manifest: Manifest) -> list[tuple[str, int | None, str]]:
    """(id, line, message) of each problem, in the order reported."""
    return [(p.id, p.origin.line if p.origin else None, p.message) for p in manifest.problems]


# -- valid manifests ---------------------------------------------------------------------------


def test_valid_manifest_gives_declarations_with_origins(tmp_path: Path) -> None:
    path, manifest = load(
        tmp_path,
        """
        version: 1
        events:
          orders.placed:
            description: A customer placed an order.
            schema:
              type: object
              required: [order_id]
              properties:
                order_id: {type: integer}
            redact: [email, phone]
            record: failures
          orders.shipped:
            durable: false
            type: tests.app.typed_events.Shipment
          orders.noted:
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
          - event: orders.*
            handler: tests.app.handlers.record_other
            name: audit
            mode: async
            queue: billing
            when: {total: {gte: 1000}}
            retry: {max_attempts: 5, backoff: 0.5, max_backoff: 30, jitter: false}
            broadcast: true
            idempotent: true
            timeout: 2.5
        """,
    )
    file = str(path)

    assert manifest.problems == []
    assert manifest.events == [
        EventDeclaration(
            name="orders.placed",
            origin=Origin("manifest", file, 3),
            description="A customer placed an order.",
            schema={
                "type": "object",
                "required": ["order_id"],
                "properties": {"order_id": {"type": "integer"}},
            },
            redact=("email", "phone"),
            record="failures",
        ),
        EventDeclaration(
            name="orders.shipped",
            origin=Origin("manifest", file, 12),
            type_path="tests.app.typed_events.Shipment",
            durable=False,
        ),
        EventDeclaration(name="orders.noted", origin=Origin("manifest", file, 15)),
    ]
    assert manifest.subscriptions == [
        SubscriptionDeclaration(
            name="orders.placed:tests.app.handlers.record",
            event="orders.placed",
            handler="tests.app.handlers.record",
            origin=Origin("manifest", file, 17),
        ),
        SubscriptionDeclaration(
            name="audit",
            event="orders.*",
            handler="tests.app.handlers.record_other",
            origin=Origin("manifest", file, 19),
            mode="async",
            queue="billing",
            when={"total": {"gte": 1000}},
            retry={"max_attempts": 5, "backoff": 0.5, "max_backoff": 30, "jitter": False},
            broadcast=True,
            idempotent=True,
            timeout=2.5,
        ),
    ]
    assert str(manifest.subscriptions[1].origin) == f"{file}:19"


def test_manifest_with_only_a_version_declares_nothing(tmp_path: Path) -> None:
    _, manifest = load(tmp_path, "version: 1\n")

    assert (manifest.events, manifest.subscriptions, manifest.problems) == ([], [], [])


def test_the_shipped_schema_is_the_one_used() -> None:
    schema = manifest_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["version"]
    assert set(schema["$defs"]["subscription"]["properties"]["mode"]["enum"]) == {
        "inline",
        "sync",
        "async",
        "webhook",
    }


def test_the_schema_field_says_that_format_is_an_annotation() -> None:
    """docs/manifest.md is generated from these descriptions (docs/_ext/manifest_reference.py)."""
    event = manifest_schema()["$defs"]["event"]["properties"]

    assert (
        "`format` (`date-time`, `uuid`, `email`...) is an annotation that validation does "
        "not assert" in event["schema"]["description"]
    )


# -- E101: missing or unreadable file ----------------------------------------------------------


def test_missing_file_is_E101(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "events.yaml"

    manifest = load_manifest(path)

    assert manifest.problems == [
        Problem(
            "django_events.E101",
            f"Manifest file {str(path)!r} does not exist.",
            "Fix the path in DJANGO_EVENTS['MANIFESTS'].",
            Origin("manifest", str(path)),
        )
    ]
    assert (manifest.events, manifest.subscriptions) == ([], [])


def test_directory_instead_of_file_is_E101(tmp_path: Path) -> None:
    manifest = load_manifest(tmp_path)

    [problem] = manifest.problems
    assert problem.id == "django_events.E101"
    assert problem.message.startswith(f"Manifest file {str(tmp_path)!r} cannot be read: ")
    assert "Is a directory" in problem.message
    assert problem.origin == Origin("manifest", str(tmp_path))


# -- E102: YAML syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        pytest.param(
            """
            version: 1
            events:
              orders.placed:
                description: a: b
            """,
            4,
            "YAML syntax error: mapping values are not allowed here",
            id="mapping-in-scalar",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed: {description: x
            subscriptions: []
            """,
            4,
            "YAML syntax error: expected ',' or '}', but got ':' "
            "(while parsing a flow mapping at line 3)",
            id="unclosed-flow-mapping",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed:
                description: "unterminated
              orders.shipped: {}
            """,
            6,
            "YAML syntax error: found unexpected end of stream "
            "(while scanning a quoted scalar at line 4)",
            id="unclosed-quote",
        ),
        pytest.param(
            "version: 1\n\tevents: {}\n",
            2,
            "YAML syntax error: found character '\\t' that cannot start any token",
            id="tab",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed: !!python/object/apply:os.system ["true"]
            """,
            3,
            "YAML syntax error: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'",
            id="unsafe-tag-refused",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed: {}
            subscriptions:
              - event: orders.placed
                handler: tests.app.handlers.record
                mode: sync
                mode: async
            """,
            8,
            "YAML syntax error: duplicate key 'mode' at $.subscriptions[0].mode (first at line 7)",
            id="duplicate-key",
        ),
    ],
)
def test_yaml_errors_are_E102_with_the_1_based_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path, manifest = load(tmp_path, text)

    assert summary(manifest) == [("django_events.E102", line, message)]
    assert str(manifest.problems[0]).startswith(f"django_events.E102 {path}:{line}: ")
    if "duplicate key" in message:  # the file is loaded all the same, with the last value
        assert manifest.problems[0].hint == (
            "Remove one of them: until then the last one is used, as YAML does."
        )
        assert [s.mode for s in manifest.subscriptions] == ["async"]
    else:
        assert manifest.problems[0].hint == (
            "Fix the YAML at that line: the file is ignored until then."
        )
        assert not manifest.events and not manifest.subscriptions


def test_a_character_yaml_does_not_allow_is_E102_at_its_line(tmp_path: Path) -> None:
    # A control character pasted with a description: YAML refuses the whole stream before
    # parsing it, and says where only as an offset into the text.
    path, manifest = load(
        tmp_path,
        'version: 1\nevents:\n  orders.placed:\n    description: "ring \x07 twice"\n',
    )

    assert summary(manifest) == [
        (
            "django_events.E102",
            4,
            "YAML syntax error: unacceptable character #x0007: special characters are not allowed",
        )
    ]
    assert str(manifest.problems[0]).startswith(f"django_events.E102 {path}:4: ")
    assert manifest.problems[0].hint.startswith("Remove the character at that line")
    assert not manifest.events


def test_a_url_pasted_as_a_key_twice_is_masked_in_E102_as_in_E103(tmp_path: Path) -> None:
    _, manifest = load(
        tmp_path,
        """
        version: 1
        subscriptions:
          - event: orders.placed
            handler: tests.app.handlers.record
            https://hooks.example.com/T0KEN: 1
            https://hooks.example.com/T0KEN: 2
        """,
    )

    assert summary(manifest) == [
        (
            "django_events.E102",
            6,
            "YAML syntax error: duplicate key '•••' at $.subscriptions[0]['•••'] (first at line 5)",
        ),
        (
            "django_events.E103",
            3,
            "$.subscriptions[0]: Additional properties are not allowed ('•••' was unexpected)",
        ),
    ]


def test_event_declared_twice_in_one_file_is_E106_not_a_silent_override(tmp_path: Path) -> None:
    path, manifest = load(
        tmp_path,
        """
        version: 1
        events:
          orders.placed:
            description: first
          orders.shipped: {}
          orders.placed:
            description: second
        """,
    )

    assert summary(manifest) == [
        ("django_events.E106", 6, f"Event 'orders.placed' is declared twice (also at {path}:3)")
    ]


# -- E103: the manifest schema -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            """
            version: 1
            events:
              orders.placed:
                description: x
                colour: red
            """,
            [
                (
                    5,
                    "$.events['orders.placed'].colour: Additional properties are not allowed "
                    "('colour' was unexpected)",
                )
            ],
            id="unknown-event-key",
        ),
        pytest.param(
            """
            version: 1
            events: {}
            handlers: []
            """,
            [(3, "$.handlers: Additional properties are not allowed ('handlers' was unexpected)")],
            id="unknown-top-level-key",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
                handler: tests.app.handlers.record
                retries: 3
            """,
            [
                (
                    5,
                    "$.subscriptions[0].retries: Additional properties are not allowed "
                    "('retries' was unexpected)",
                )
            ],
            id="unknown-subscription-key",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
                handler: tests.app.handlers.record
                mode: later
            """,
            [
                (
                    5,
                    "$.subscriptions[0].mode: 'later' is not one of "
                    "['inline', 'sync', 'async', 'webhook']",
                )
            ],
            id="bad-mode",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed: {}
              "orders placed!":
                description: x
            """,
            [
                (
                    4,
                    "$.events['orders placed!']: 'orders placed!' does not match "
                    "'^[A-Za-z0-9_.-]+$'",
                )
            ],
            id="bad-event-name",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders placed
                handler: tests.app.handlers.record
            """,
            [(3, "$.subscriptions[0].event: 'orders placed' does not match '^[A-Za-z0-9_.*-]+$'")],
            id="bad-subscription-event",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
                handler: tests.app.handlers.record
                mode: async
                retry:
                  max_attempts: 0
                  backoff: -1
                  max_backoff: soon
                  jitter: yes please
                  forever: true
            """,
            [
                (7, "$.subscriptions[0].retry.max_attempts: 0 is less than the minimum of 1"),
                (8, "$.subscriptions[0].retry.backoff: -1 is less than the minimum of 0"),
                (9, "$.subscriptions[0].retry.max_backoff: 'soon' is not of type 'number'"),
                (10, "$.subscriptions[0].retry.jitter: 'yes please' is not of type 'boolean'"),
                (
                    11,
                    "$.subscriptions[0].retry.forever: Additional properties are not allowed "
                    "('forever' was unexpected)",
                ),
            ],
            id="bad-retry",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
                handler: tests.app.handlers.record
                mode: async
                retry: {max_attempts: 2.5}
                timeout: 0
            """,
            [
                (6, "$.subscriptions[0].retry.max_attempts: 2.5 is not of type 'integer'"),
                (7, "$.subscriptions[0].timeout: 0 is less than or equal to the minimum of 0"),
            ],
            id="bad-retry-and-timeout",
        ),
        pytest.param(
            """
            version: 1
            events:
              orders.placed:
                schema: {type: object}
                description: both
                type: tests.app.typed_events.Shipment
            """,
            [
                (
                    6,
                    "$.events['orders.placed'].type: 'schema' and 'type' cannot both be given; "
                    "use one of them",
                )
            ],
            id="schema-and-type",
        ),
        pytest.param(
            """
            version: 2
            events: {}
            """,
            [(1, "$.version: 1 was expected")],
            id="wrong-version",
        ),
        pytest.param(
            """
            events:
              orders.placed: {}
            """,
            [(1, "$: 'version' is a required property")],
            id="no-version",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
              - handler: tests.app.handlers.record
                event: orders.placed
                name: ""
            """,
            [
                (3, "$.subscriptions[0]: 'handler' is a required property"),
                (6, "$.subscriptions[1].name: '' should be non-empty"),
            ],
            id="missing-handler-and-empty-name",
        ),
        pytest.param(
            """
            version: 1
            subscriptions:
              - event: orders.placed
                handler: record
            """,
            [
                (
                    4,
                    "$.subscriptions[0].handler: 'record' does not match "
                    "'^[A-Za-z_][A-Za-z0-9_]*(\\\\.[A-Za-z_][A-Za-z0-9_]*)+$'",
                )
            ],
            id="handler-not-dotted",
        ),
        pytest.param(
            """
            - version: 1
            """,
            [(1, "$: [{'version': 1}] is not of type 'object'")],
            id="not-a-mapping",
        ),
    ],
)
def test_schema_mismatch_is_E103_with_path_and_line_of_the_offending_key(
    tmp_path: Path, text: str, expected: list[tuple[int, str]]
) -> None:
    path, manifest = load(tmp_path, text)

    assert summary(manifest) == [("django_events.E103", line, msg) for line, msg in expected]
    assert all(p.hint == HINT for p in manifest.problems)
    assert all(p.origin is not None and p.origin.file == str(path) for p in manifest.problems)
    # A manifest that does not match its schema is rejected: the registry uses none of it (no
    # half-read wiring); what matches is read for the checks only (test_checks.py).
    assert manifest.rejected


@pytest.mark.parametrize(
    ("head", "built"),
    [
        ("version: 1", (["orders.placed"], ["orders.placed:tests.app.handlers.record"])),
        ("version: 1\nextra: 1", (["orders.placed"], ["orders.placed:tests.app.handlers.record"])),
        ("version: 2", ([], [])),  # another format: nothing is read
        ("", ([], [])),  # no version
    ],
)
def test_a_rejected_manifest_still_reads_what_matches_for_the_checks(
    tmp_path: Path, head: str, built: tuple[list[str], list[str]]
) -> None:
    """Each declaration with a schema error is left out, the others are read (for the
    checks: the registry uses none of a rejected manifest)."""
    body = """
        events:
          orders.placed: {}
          orders.lost: {durable: "yes"}
        subscriptions:
          - {event: orders.placed, handler: tests.app.handlers.record}
          - {event: orders.placed, handler: tests.app.handlers.record, mode: bogus}
        sources:
          broken: {auth: github}
        """
    _, manifest = load(tmp_path, head + textwrap.dedent(body))

    assert manifest.rejected
    assert ([e.name for e in manifest.events], [s.name for s in manifest.subscriptions]) == built
    assert manifest.sources == []
    assert manifest.left_out == (["orders.lost"] if built[0] else [])


def test_an_event_with_no_body_is_valid(tmp_path: Path) -> None:
    # `name:` with nothing after it is null: a declaration with every default.
    _, manifest = load(
        tmp_path,
        """
        version: 1
        events:
          orders.noted:
        """,
    )

    assert manifest.problems == []
    assert [e.name for e in manifest.events] == ["orders.noted"]


@pytest.mark.parametrize("text", ["", "\n\n", "# events come later\n"])
def test_an_empty_file_is_E103_saying_it_is_empty(tmp_path: Path, text: str) -> None:
    path, manifest = load(tmp_path, text)

    assert manifest.problems == [
        Problem(
            "django_events.E103",
            "The manifest is empty: it needs at least 'version: 1'",
            "Write version: 1 in it (then events: and subscriptions:), or remove it from "
            "DJANGO_EVENTS['MANIFESTS'].",
            Origin("manifest", str(path)),
        )
    ]


def test_a_missing_relative_path_is_E101_naming_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    manifest = load_manifest(Path("config") / "events.yaml")

    assert manifest.problems == [
        Problem(
            "django_events.E101",
            f"Manifest file 'config/events.yaml' does not exist (relative paths are looked up "
            f"in the working directory, {str(tmp_path)!r})",
            'Make it absolute, as BASE_DIR / "config/events.yaml" in '
            "DJANGO_EVENTS['MANIFESTS']: the working directory depends on where the process "
            "starts.",
            Origin("manifest", "config/events.yaml"),
        )
    ]


# -- settings: EVENTS and SUBSCRIPTIONS --------------------------------------------------------


def test_settings_declarations_have_settings_origins() -> None:
    manifest = parse_settings(
        {"billing.invoiced": {"description": "An invoice was sent."}},
        [{"event": "billing.invoiced", "handler": "tests.app.handlers.record", "mode": "inline"}],
    )

    assert manifest.problems == []
    assert manifest.events == [
        EventDeclaration(
            "billing.invoiced",
            Origin("settings", "settings.DJANGO_EVENTS['EVENTS']['billing.invoiced']"),
            description="An invoice was sent.",
        )
    ]
    [subscription] = manifest.subscriptions
    assert subscription.mode == "inline"
    assert str(subscription.origin) == "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]"


def test_settings_errors_name_the_setting() -> None:
    manifest = parse_settings(
        {"ok.event": {}, "bad name": {}, "other.event": {"colour": "red"}},
        [
            {"event": "ok.event", "handler": "tests.app.handlers.record"},
            {"event": "ok.event", "handler": "tests.app.handlers.record", "mode": "eventually"},
        ],
    )

    assert [(p.id, str(p.origin), p.message) for p in manifest.problems] == [
        (
            "django_events.E103",
            "settings.DJANGO_EVENTS['EVENTS']['bad name']",
            "$.events['bad name']: 'bad name' does not match '^[A-Za-z0-9_.-]+$'",
        ),
        (
            "django_events.E103",
            "settings.DJANGO_EVENTS['EVENTS']['other.event']",
            "$.events['other.event'].colour: Additional properties are not allowed "
            "('colour' was unexpected)",
        ),
        (
            "django_events.E103",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][1]",
            "$.subscriptions[1].mode: 'eventually' is not one of "
            "['inline', 'sync', 'async', 'webhook']",
        ),
    ]


def test_settings_errors_reach_the_registry() -> None:
    with wiring(
        {"event": "orders.placed", "handler": "tests.app.handlers.record", "when": "total > 3"},
        EVENTS={"orders.refunded": {"schema": "object"}},
    ):
        problems = [(p.id, str(p.origin), p.message) for p in get_registry().problems]

    assert problems == [
        (
            "django_events.E103",
            "settings.DJANGO_EVENTS['EVENTS']['orders.refunded']",
            "$.events['orders.refunded'].schema: 'object' is not of type 'object', 'boolean'",
        ),
        (
            "django_events.E103",
            "settings.DJANGO_EVENTS['SUBSCRIPTIONS'][0]",
            "$.subscriptions[0].when: 'total > 3' is not of type 'object'",
        ),
    ]


def test_settings_of_the_wrong_type_are_E001_naming_the_key() -> None:
    with wiring(SUBSCRIPTIONS={"event": "orders.placed"}, RECORD="sometimes", COLOUR="red"):
        problems = [(p.id, p.message) for p in get_registry().problems]

    assert problems == [
        ("django_events.W001", "DJANGO_EVENTS has unknown key 'COLOUR'"),
        ("django_events.E001", "DJANGO_EVENTS['RECORD'] is 'sometimes'"),
        ("django_events.E001", "DJANGO_EVENTS['SUBSCRIPTIONS'] is {'event': 'orders.placed'}"),
    ]


@pytest.mark.parametrize(
    ("key", "value", "hint"),
    [
        ("EVENTS", ["orders.placed"], "A dict: event name -> declaration."),
        ("EVENTS", "orders.placed", "A dict: event name -> declaration."),
        ("SUBSCRIPTIONS", "orders.placed", "A list of subscription declarations (dicts)."),
        # A string is not read as a list of one-letter paths (no E101 per character).
        ("MANIFESTS", "events.yaml", "A list of paths of YAML manifests."),
        ("PIPELINE", "tests.Interceptor", "A list of dotted paths of interceptors."),
        ("PIPELINE", [3], "A list of dotted paths of interceptors."),
        ("AUTODISCOVER", "yes", "True or False."),
        ("DEFAULT_QUEUE", "", "A queue name."),
    ],
)
def test_a_setting_of_the_wrong_shape_is_reported_not_raised(
    key: str, value: object, hint: str
) -> None:
    with wiring(**{key: value}):
        problems = [(p.id, str(p.origin), p.message, p.hint) for p in get_registry().problems]

    message = (
        f"DJANGO_EVENTS[{key!r}] is {value!r}"
        if not isinstance(value, list) or not value or isinstance(value[0], str)
        else f"DJANGO_EVENTS[{key!r}] is invalid: [0] 3 is not of type 'string'"
    )
    assert problems == [("django_events.E001", "settings.DJANGO_EVENTS", message, hint)]


def test_a_tuple_is_as_good_as_a_list_in_settings() -> None:
    with wiring(PIPELINE=(), MANIFESTS=(), SUBSCRIPTIONS=()):
        assert get_registry().problems == []


def test_default_retry_that_is_not_a_mapping_is_E001() -> None:
    with wiring(DEFAULT_RETRY="fast"):
        [problem] = get_registry().problems

    assert problem.id == "django_events.E001"
    assert problem.message == "DJANGO_EVENTS['DEFAULT_RETRY'] is 'fast'"
    assert problem.hint == "Keys: max_attempts, backoff, max_backoff, jitter."


def test_default_retry_values_are_checked_like_a_subscription_retry() -> None:
    with wiring(DEFAULT_RETRY={"max_attempts": 0, "backoff": "fast"}):
        problems = [(p.id, p.message) for p in get_registry().problems]

    assert [i for i, _ in problems] == ["django_events.E001", "django_events.E001"]
    assert "max_attempts" in problems[0][1] + problems[1][1]
    assert "backoff" in problems[0][1] + problems[1][1]


def test_manifests_from_settings_are_loaded_in_order(tmp_path: Path) -> None:
    extra = write(
        tmp_path,
        """
        version: 1
        events:
          billing.invoiced: {}
        subscriptions:
          - event: billing.invoiced
            handler: tests.app.handlers.record
        """,
    )
    missing = tmp_path / "missing.yaml"

    with wiring(MANIFESTS=[*settings.DJANGO_EVENTS["MANIFESTS"], extra, str(missing)]):
        registry = get_registry()

    assert registry.sources[1:] == [str(extra), str(missing)]
    assert "billing.invoiced" in registry.events
    assert [(p.id, str(p.origin)) for p in registry.problems] == [
        ("django_events.E101", str(missing))
    ]
