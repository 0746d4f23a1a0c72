"""The policy file: schema, validation messages (file, line, field), hash, render, reload."""

from __future__ import annotations

import os
import textwrap
import threading
from pathlib import Path

import pytest

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.drift import Thresholds
from infertap.agent.inspect.pii import PiiScanner
from infertap.agent.policy.loader import (
    DEFAULT_POLICY_YAML,
    PolicyError,
    default_policy,
    load_policy,
    load_policy_text,
    render_policy,
    validate_file,
)
from infertap.agent.policy.schema import (
    ActionsSpec,
    CircuitSpec,
    DriftSpec,
    SchemaSpec,
    ServiceSpec,
    SeverityActions,
)
from infertap.agent.policy.watcher import PolicyWatcher

ROOT = Path(__file__).resolve().parent.parent
DAEMONSET_POLICY = ROOT / "daemonset" / "base" / "policy.yaml"

FULL = textwrap.dedent(
    """\
    version: 1
    discovery:
      namespaceSelector:
        matchLabels: {team: ml}
        matchExpressions:
          - {key: tier, operator: In, values: [prod, staging]}
          - {key: legacy, operator: DoesNotExist}
    services:
      - {name: triton, port: 8000}
      - {name: pinned, port: 9000, ip: "2001:db8:0:0::1"}
    models:
      - name: fraud
        version: "2"
        baseline: baselines/fraud-v2.json
        features: [amount, merchant]
        drift:
          window: 200
          thresholds:
            psi: {alert: 0.4}
      - name: fraud
        baseline: /abs/fraud.json
        schema: {max_payload_bytes: 1024}
    sampling: {sample_bytes: 1024, sample_one_in: 4}
    pii:
      enabled: true
      types: [ssn, email]
      custom:
        employee_id: 'EMP-\\d{6}'
    drift:
      window: 300
      thresholds:
        ks: {warn: 0.15, alert: 0.35}
    schema: {range_tolerance: 0.5}
    actions:
      pii: {alert: circuit_break}
      schema: {alert: block_flow}
    circuit:
      pii_hits: 3
      pii_window: 2m
      cooldown: 500ms
      max_cooldown: 1h
      probe: 20
    """
)


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing `needle` (so tests name lines by content)."""
    (hit, *_) = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return hit


# --- valid policies ----------------------------------------------------------------------------


def test_full_example(tmp_path: Path) -> None:
    p = load_policy_text(FULL, "policy.yaml", tmp_path)
    sel = p.discovery.namespace_selector
    assert sel is not None
    assert dict(sel.match_labels) == {"team": "ml"}
    assert [(r.key, r.operator, r.values) for r in sel.match_expressions] == [
        ("tier", "In", ("prod", "staging")),
        ("legacy", "DoesNotExist", ()),
    ]
    assert sel.matches({"team": "ml", "tier": "prod"})
    assert not sel.matches({"team": "ml", "tier": "prod", "legacy": "1"})
    assert p.services == (ServiceSpec("triton", 8000), ServiceSpec("pinned", 9000, "2001:db8::1"))
    assert p.is_model_service(Endpoint("10.0.0.7", 8000))
    assert p.is_model_service(Endpoint("2001:db8::1", 9000))
    assert not p.is_model_service(Endpoint("2001:db8::2", 9000))
    assert not p.is_model_service(Endpoint("10.0.0.7", 8001))

    global_drift = DriftSpec(300, ks=Thresholds(0.15, 0.35))
    assert p.drift == global_drift
    assert p.schema == SchemaSpec(range_tolerance=0.5)
    v2, anyv = p.model("fraud", "2"), p.model("fraud", "7")
    assert v2 is not None and anyv is not None
    assert (v2.version, v2.baseline, v2.features) == (
        "2",
        str(tmp_path / "baselines" / "fraud-v2.json"),
        ("amount", "merchant"),
    )
    # Per-model overrides sit on top of the policy's sections, field by field.
    assert v2.drift == DriftSpec(200, psi=Thresholds(0.1, 0.4), ks=Thresholds(0.15, 0.35))
    assert v2.schema == SchemaSpec(range_tolerance=0.5)
    assert (anyv.version, anyv.baseline, anyv.features) == (None, "/abs/fraud.json", ())
    assert anyv.drift == global_drift
    assert anyv.schema == SchemaSpec(max_payload_bytes=1024, range_tolerance=0.5)
    assert p.model("other") is None
    assert v2.drift.to_config().thresholds["psi"] == Thresholds(0.1, 0.4)
    assert v2.drift.to_config().window == 200

    assert (p.sampling.sample_bytes, p.sampling.sample_one_in) == (1024, 4)
    assert p.pii.types == ("email", "ssn")  # the scanner's order, not the file's
    assert p.pii.custom_patterns() == {"employee_id": r"EMP-\d{6}"}
    scanner = PiiScanner(custom=p.pii.custom_patterns(), types=p.pii.types)
    assert [m.type for m in scanner.scan_text("badge EMP-123456")] == ["employee_id"]

    assert p.actions == ActionsSpec(
        pii=SeverityActions("log", "alert", "circuit_break"),
        drift=SeverityActions("log", "alert", "circuit_break"),
        schema=SeverityActions("log", "log", "block_flow"),
    )
    assert p.action_for("schema", "alert") == "block_flow"
    assert p.action_for("pii", "warn") == "alert"
    assert p.circuit == CircuitSpec(3, 120.0, 0.5, 3600.0, 20.0)
    assert p.source == "policy.yaml"


def test_daemonset_policy() -> None:
    p = load_policy(DAEMONSET_POLICY)
    assert [(s.name, s.port, s.ip) for s in p.services] == [
        ("triton-http", 8000, None),
        ("triton-grpc", 8001, None),
        ("tfserving-grpc", 8500, None),
        ("mlserver-http", 9000, None),
    ]
    sel = p.discovery.namespace_selector
    assert sel is not None and dict(sel.match_labels) == {"infertap.io/inspect": "true"}
    assert p.models == ()
    assert p.pii.enabled is True
    assert p.pii.types == ("email", "ipv6", "ipv4", "credit_card", "ssn", "phone")
    assert p.drift == DriftSpec(500, psi=Thresholds(0.1, 0.25))
    assert p.actions.pii == SeverityActions("log", "alert", "alert")
    assert p.actions.drift == SeverityActions("log", "alert", "circuit_break")
    assert p.circuit == CircuitSpec(5, 60.0, 60.0, 600.0, 15.0)
    assert validate_file(DAEMONSET_POLICY) == []


def test_builtin_default_policy() -> None:
    p = default_policy()
    assert [s.port for s in p.services] == [8000, 8001, 8080, 8500, 8501]
    assert p.models == ()
    assert p.discovery.namespace_selector is None
    assert p.pii.enabled and len(p.pii.types) == 7
    assert p.drift == DriftSpec()
    assert p.drift.psi == Thresholds(0.1, 0.25)
    assert p.actions == ActionsSpec()
    assert p.circuit == CircuitSpec()
    assert p.source == "<built-in>"
    assert p.hash == default_policy().hash and len(p.hash) == 12


@pytest.mark.parametrize("text", [FULL, DEFAULT_POLICY_YAML, DAEMONSET_POLICY.read_text()])
def test_render_loads_back_to_the_same_policy(text: str, tmp_path: Path) -> None:
    p = load_policy_text(text, "policy.yaml", tmp_path)
    rendered = render_policy(p)
    assert rendered.startswith(f"# infertap policy {p.hash} (normalized from policy.yaml)\n")
    again = load_policy_text(rendered, "shown.yaml", Path("/elsewhere"))
    assert again == p
    assert again.hash == p.hash


def test_empty_sections_take_defaults() -> None:
    p = load_policy_text("version: 1\nmodels:\nservices: []\n", "p.yaml")
    assert (p.models, p.services) == ((), ())
    assert p.hash == load_policy_text("version: 1\n", "p.yaml").hash


# --- hash --------------------------------------------------------------------------------------


def test_hash_ignores_key_order_comments_and_spelled_out_defaults() -> None:
    a = "version: 1\npii: {enabled: true, types: [email, ssn]}\ncircuit: {cooldown: 30s}\n"
    b = textwrap.dedent(
        """\
        # the same policy, written differently
        circuit:
          cooldown: 30      # seconds
          probe: 10s        # the default
        pii:
          types: [ssn, email]
          enabled: yes
        version: 1
        """
    )
    assert load_policy_text(a).hash == load_policy_text(b).hash


def test_sampling_capture_defaults_to_skb_and_keeps_old_hashes() -> None:
    plain = load_policy_text("version: 1\n", "p.yaml")
    skb = load_policy_text("version: 1\nsampling: {capture: skb}\n", "p.yaml")
    sk_msg = load_policy_text("version: 1\nsampling: {capture: sk_msg}\n", "p.yaml")
    assert plain.sampling.capture == skb.sampling.capture == "skb"
    assert sk_msg.sampling.capture == "sk_msg"
    # Spelling out the default changes nothing, so policies from before the key keep their hash.
    assert plain.hash == skb.hash != sk_msg.hash


def test_hash_changes_with_content() -> None:
    base = "version: 1\ndrift: {thresholds: {psi: {alert: 0.25}}}\n"
    changed = "version: 1\ndrift: {thresholds: {psi: {alert: 0.26}}}\n"
    hashes = {
        load_policy_text(base).hash,
        load_policy_text(changed).hash,
        load_policy_text("version: 1\nservices: [{name: a, port: 1}]\n").hash,
        load_policy_text("version: 1\nservices: [{name: a, port: 2}]\n").hash,
        load_policy_text("version: 1\nactions: {pii: {info: alert}}\n").hash,
    }
    assert len(hashes) == 5


# --- errors: one line each, naming file, line and field ----------------------------------------

RE2_HINT = " (custom patterns run on RE2, a linear-time engine: no lookarounds or backreferences)"

BAD_THRESHOLD = textwrap.dedent(
    """\
    version: 1
    models:
      - name: a
      - name: b
        drift:
          thresholds:
            psi:
              warn: 0.3
              alert: 0.2
    """
)


@pytest.mark.parametrize(
    ("text", "needle", "expected"),
    [
        (
            BAD_THRESHOLD,
            "alert: 0.2",
            "models[1].drift.thresholds.psi.alert: must be a number greater than warn (0.3)",
        ),
        (
            "version: 1\ndrift:\n  thresholds:\n    psi: {warn: 0.5}\n",
            "warn: 0.5",
            "drift.thresholds.psi.warn: must be a number less than alert (0.25)",
        ),
        (
            "version: 1\ndrift:\n  thresholds:\n    js: {alert: 1.5}\n",
            "alert: 1.5",
            "drift.thresholds.js.alert: must be a number from 0 to 1",
        ),
        (
            "version: 1\nservices:\n  - name: a\n    port: 70000\n",
            "port: 70000",
            "services[0].port: must be an integer from 1 to 65535",
        ),
        (
            "version: 1\nservices:\n  - name: a\n    port: yes\n",
            "port: yes",
            "services[0].port: must be an integer from 1 to 65535",
        ),
        (
            "version: 1\nservices:\n  - name: a\n    port: 1\n  - port: 2\n",
            "port: 2",
            "services[1].name: required",
        ),
        (
            "version: 1\nservices:\n  - {name: a, port: 1}\n  - {name: a, port: 2}\n",
            "port: 2",
            "services[1].name: duplicate of services[0]",
        ),
        (
            "version: 1\nservices:\n  - {name: a, port: 1, ip: 10.0.0.300}\n",
            "ip:",
            "services[0].ip: must be an IPv4 or IPv6 address",
        ),
        (
            "version: 1\npii:\n  custom:\n    badge: 'EMP-(\\d+'\n",
            "badge",
            "pii.custom.badge: bad regex: missing ): EMP-(\\d+" + RE2_HINT,
        ),
        (  # a lookbehind needs backtracking: refused, not run on a backtracking engine
            "version: 1\npii:\n  custom:\n    badge: '(?<!\\w)EMP-\\d+'\n",
            "badge",
            "pii.custom.badge: bad regex: invalid perl operator: (?<!" + RE2_HINT,
        ),
        (
            "version: 1\npii:\n  custom:\n    anything: '.*'\n",
            "anything",
            "pii.custom.anything: bad regex: it matches the empty string",
        ),
        (
            "version: 1\npii:\n  custom:\n    email: 'x@y'\n",
            "email",
            "pii.custom.email: a custom type name must be an identifier, not a built-in type",
        ),
        (
            "version: 1\npii:\n  types: [email, ip_address]\n",
            "types",
            "pii.types[1]: must be one of: email, iban, ipv6, ipv4, credit_card, ssn, phone",
        ),
        (
            "version: 1\npii:\n  enabled: 1\n",
            "enabled",
            "pii.enabled: must be true or false",
        ),
        (
            "version: 1\ncircuit:\n  cooldown: 10 minutes\n",
            "cooldown",
            "circuit.cooldown: must be a duration up to 7 days: seconds, or 500ms, 30s, 10m, 1h",
        ),
        (
            "version: 1\ncircuit:\n  cooldown: 2m\n  max_cooldown: 60s\n",
            "max_cooldown",
            "circuit.max_cooldown: max_cooldown (60s) must be at least cooldown (120s)",
        ),
        (
            "version: 1\nactions:\n  drift:\n    alert: block_flow\n",
            "block_flow",
            "actions.drift.alert: must be one of: log, alert, circuit_break",
        ),
        (
            "version: 1\nactions:\n  pii: {alert: drop}\n",
            "drop",
            "actions.pii.alert: must be one of: log, alert, block_flow, circuit_break",
        ),
        (
            "version: 1\ndiscovery:\n  namespaceSelector:\n    matchLabels:\n      inspect: true\n",
            "inspect: true",
            "discovery.namespaceSelector.matchLabels.inspect: must be a non-empty string"
            " (write it in quotes: YAML read True as a bool)",
        ),
        (
            "version: 1\ndiscovery:\n  namespaceSelector:\n    matchExpressions:\n"
            "      - {key: a, operator: In}\n",
            "operator",
            "discovery.namespaceSelector.matchExpressions[0]: In needs values exactly when it is"
            " In or NotIn",
        ),
        (
            "version: 1\nsampling:\n  sample_bytes: 100000\n",
            "sample_bytes",
            "sampling.sample_bytes: must be an integer from 1 to 16384",
        ),
        (
            "version: 1\nsampling:\n  capture: xdp\n",
            "capture",
            "sampling.capture: must be one of: skb, sk_msg",
        ),
        (
            "version: 1\ndrift:\n  window: 1\n",
            "window",
            "drift.window: must be an integer from 2 to 1000000",
        ),
        (
            "version: 1\nmodels:\n  - name: m\n    features: [a, a]\n",
            "features",
            "models[0].features[1]: duplicate feature 'a'",
        ),
        (
            "version: 1\nmodels:\n  - {name: m, version: '1'}\n"
            "  - {name: m, version: '1', features: [x]}\n",
            "features: [x]",
            "models[1]: model 'm' version 1 is also models[0]",
        ),
        ("version: 2\n", "version", "version: must be an integer from 1 to 1"),
        ("pii: {enabled: true}\n", "pii", "version: required"),
    ],
)
def test_error_names_line_and_field(text: str, needle: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    line = line_of(text, needle)
    assert info.value.messages == [f"policy.yaml:{line}: {expected}"]
    assert str(info.value) == info.value.messages[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\ncircuit:\n  cooldwn: 5s\n",
            "policy.yaml:3: circuit.cooldwn: unknown key (did you mean 'cooldown'?); known:"
            " pii_hits, pii_window, cooldown, max_cooldown, probe",
        ),
        (
            "version: 1\nmodel:\n  - name: a\n",
            "policy.yaml:2: model: unknown key (did you mean 'models'?); known: version,"
            " discovery, services, models, sampling, pii, drift, schema, actions, circuit, routes,"
            " mirror, acceleration, polyfill, tracing",
        ),
        (
            "version: 1\nservices:\n  - {name: a, port: 1, protocol: http}\n",
            "policy.yaml:3: services[0].protocol: unknown key; known: name, port, ip",
        ),
        (
            "version: 1\ndrift:\n  thresholds:\n    psi: {warn: 0.1, alrt: 0.3}\n",
            "policy.yaml:4: drift.thresholds.psi.alrt: unknown key (did you mean 'alert'?);"
            " known: warn, alert",
        ),
    ],
)
def test_unknown_keys_are_errors(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    assert info.value.messages == [expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "policy.yaml:1: the policy is empty"),
        ("# nothing but a comment\n", "policy.yaml:1: the policy is empty"),
        ("- version: 1\n", "policy.yaml:1: must be a mapping"),
        (
            "version: 1\npii:\n  enabled: true\n enabled: false\n",
            "policy.yaml:4: not valid YAML: expected <block end>,"
            " but found '<block mapping start>'",
        ),
        (
            "version: 1\nversion: 1\n",
            "policy.yaml:2: duplicate key 'version' (first on line 1)",
        ),
        (
            "version: 1\nsampling: &s {sample_bytes: 1, <<: *s}\n",
            "policy.yaml:2: merge keys (<<) are not supported in a policy",
        ),
        (
            "version: 1\nservices: [\n",
            "policy.yaml:3: not valid YAML: expected the node content, but found '<stream end>'",
        ),
    ],
)
def test_documents_that_are_not_policies(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    assert info.value.messages == [expected]


def test_all_problems_are_listed_in_file_order() -> None:
    text = "version: 1\ncircuit: {probe: 0}\nservices:\n  - {name: a, port: 0}\npii: {enabled: 2}\n"
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "p.yaml")
    assert info.value.messages == [
        "p.yaml:2: circuit.probe: must be a duration up to 7 days: seconds, or 500ms, 30s, 10m, 1h",
        "p.yaml:4: services[0].port: must be an integer from 1 to 65535",
        "p.yaml:5: pii.enabled: must be true or false",
    ]
    assert str(info.value) == info.value.messages[0] + " (and 2 more problems)"


def test_validate_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(FULL)
    bad.write_text("version: 1\nsampling: {sample_one_in: -1}\n")
    assert validate_file(good) == []
    assert validate_file(bad) == [
        f"{bad}:2: sampling.sample_one_in: must be an integer from 0 to 1073741824"
    ]
    missing = tmp_path / "missing.yaml"
    assert validate_file(missing) == [
        f"{missing}: cannot read the policy: No such file or directory"
    ]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    assert validate_file(binary) == [f"{binary}: not UTF-8 text (byte 11)"]
    # Relative baselines are taken from the policy's folder.
    assert load_policy(good).model("fraud", "2").baseline == str(  # type: ignore[union-attr]
        tmp_path / "baselines" / "fraud-v2.json"
    )


def test_alias_bombs_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    with pytest.raises(PolicyError) as info:
        load_policy_text("\n".join(lines) + "\n", "p.yaml")
    (message,) = info.value.messages
    assert message.endswith("the document is nested too deeply or too large for a policy")


# --- the watcher -------------------------------------------------------------------------------


class Calls:
    def __init__(self) -> None:
        self.changes: list[str] = []  # hashes of the policies handed to on_change
        self.errors: list[str] = []
        self.event = threading.Event()

    def on_change(self, policy: object) -> None:
        self.changes.append(policy.hash)  # type: ignore[attr-defined]
        self.event.set()

    def on_error(self, message: str) -> None:
        self.errors.append(message)


def write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, as editors and kubelet do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


GOOD_1 = "version: 1\nservices: [{name: a, port: 8000}]\n"
GOOD_2 = "version: 1\nservices: [{name: a, port: 8000}, {name: b, port: 9000}]\n"
BAD = "version: 1\nservices: [{name: a, port: 8000}]\ncircuit: {probe: never}\n"


def test_watcher_keeps_the_good_policy_and_picks_up_the_next(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, GOOD_1)
    calls = Calls()
    w = PolicyWatcher(path, calls.on_change, calls.on_error)
    first = w.current
    assert [s.port for s in first.services] == [8000]
    assert w.check_now() is False  # nothing changed

    write(path, BAD)
    assert w.check_now() is False
    assert w.current is first
    assert calls.errors == [
        f"{path}:3: circuit.probe: must be a duration up to 7 days: seconds, or 500ms, 30s, 10m,"
        " 1h; keeping the running policy"
    ]
    assert w.check_now() is False
    assert len(calls.errors) == 1  # an unchanged bad file is reported once

    write(path, GOOD_2)
    assert w.check_now() is True
    assert [s.port for s in w.current.services] == [8000, 9000]
    assert calls.changes == [w.current.hash]

    write(path, "# a comment now\n" + GOOD_2)  # same policy: no change to report
    assert w.check_now() is False
    assert calls.changes == [w.current.hash]
    assert len(calls.errors) == 1


def test_watcher_file_deleted_keeps_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, GOOD_1)
    calls = Calls()
    w = PolicyWatcher(path, calls.on_change, calls.on_error)
    first = w.current
    path.unlink()
    assert w.check_now() is False
    assert w.check_now() is False
    assert calls.errors == [
        f"{path}: cannot read the policy: No such file or directory; keeping the running policy"
    ]
    assert w.current is first
    write(path, GOOD_1)  # back with the same content: nothing new to report
    assert w.check_now() is False
    write(path, GOOD_2)
    assert w.check_now() is True
    assert calls.changes == [w.current.hash]


def test_watcher_same_size_rewrite_within_one_mtime_tick(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nsampling: {sample_one_in: 1}\n")
    calls = Calls()
    w = PolicyWatcher(path, calls.on_change, calls.on_error)
    stat = path.stat()
    path.write_text("version: 1\nsampling: {sample_one_in: 2}\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert w.check_now() is True
    assert w.current.sampling.sample_one_in == 2


def test_watcher_needs_a_good_file_unless_given_an_initial_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, BAD)
    calls = Calls()
    with pytest.raises(PolicyError, match=r"policy.yaml:3: circuit.probe"):
        PolicyWatcher(path, calls.on_change, calls.on_error)
    fallback = default_policy()
    w = PolicyWatcher(path, calls.on_change, calls.on_error, initial=fallback)
    assert w.current is fallback
    assert len(calls.errors) == 1 and calls.errors[0].startswith(f"{path}:3: circuit.probe")
    write(path, GOOD_1)
    assert w.check_now() is True
    assert calls.changes == [load_policy(path).hash]


def test_watcher_thread_reloads(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, GOOD_1)
    calls = Calls()
    w = PolicyWatcher(path, calls.on_change, calls.on_error, interval_s=0.01)
    w.start()
    try:
        write(path, GOOD_2)
        assert calls.event.wait(5)
    finally:
        w.stop()
    assert calls.changes == [load_policy(path).hash]
    assert [s.port for s in w.current.services] == [8000, 9000]


def test_a_failing_callback_does_not_break_the_watcher(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    write(path, GOOD_1)

    def explode(_: object) -> None:
        raise RuntimeError("callback bug")

    w = PolicyWatcher(path, explode, explode)
    write(path, GOOD_2)
    assert w.check_now() is True
    assert [s.port for s in w.current.services] == [8000, 9000]


def test_acceleration_is_off_unless_the_policy_turns_it_on(tmp_path: Path) -> None:
    base = "version: 1\nservices:\n  - {name: a, port: 8000}\n"
    off = load_policy_text(base)
    on = load_policy_text(base + "acceleration: {enabled: true}\n")
    assert off.acceleration.enabled is False and on.acceleration.enabled is True
    assert off.hash == load_policy_text(base + "acceleration: {enabled: false}\n").hash
    assert on.hash != off.hash
    with pytest.raises(PolicyError, match=r"<policy>:4: acceleration.enabled"):
        load_policy_text(base + "acceleration: {enabled: 3}\n")


def test_sampling_precedence_flag_over_policy_over_default() -> None:
    from infertap.agent.policy.schema import SamplingSpec
    from infertap.agent.runtime import AgentOptions

    policy = SamplingSpec(sample_bytes=2048, sample_one_in=3)
    assert AgentOptions().sampling(policy) == (2048, 3)
    assert AgentOptions().sampling(SamplingSpec()) == (4096, 1)
    assert AgentOptions(sample_bytes=512).sampling(policy) == (512, 3)
    assert AgentOptions(sample_one_in=0).sampling(policy) == (2048, 0)
    assert AgentOptions(sample_bytes=0, sample_one_in=1).sampling(policy) == (0, 1)
