"""The policy's `polyfill:` section: parsing, normalization, hash, errors naming line and field."""

from __future__ import annotations

import textwrap

import pytest

from infertap.agent.flows.records import Endpoint
from infertap.agent.policy.loader import PolicyError, load_policy_text, render_policy
from infertap.agent.policy.schema import PolyfillSpec

POLYFILL = textwrap.dedent(
    """\
    version: 1
    polyfill:
      - client: shop/checkout
        service: 10.0.0.5:8000
        model: fraud
        version: 2
        set_parameters: {threshold: 0.5, mode: fast}
    """
)


def test_polyfill_loads_normalized_and_round_trips() -> None:
    p = load_policy_text(POLYFILL, "policy.yaml")
    assert p.polyfill == (
        PolyfillSpec(
            "shop/checkout",
            Endpoint("10.0.0.5", 8000),
            "fraud",
            "2",
            (("mode", "fast"), ("threshold", 0.5)),
        ),
    )
    again = load_policy_text(render_policy(p), "rendered.yaml")
    assert again.polyfill == p.polyfill and again.hash == p.hash


def test_hash_covers_polyfill_only_when_present() -> None:
    bare = load_policy_text("version: 1\n")
    empty = load_policy_text("version: 1\npolyfill: []\n")
    assert bare.hash == empty.hash
    assert load_policy_text(POLYFILL).hash != bare.hash
    other = load_policy_text(POLYFILL.replace("0.5", "0.6"))
    assert other.hash != load_policy_text(POLYFILL).hash


@pytest.mark.parametrize(
    ("old", "new", "needle", "expected"),
    [
        (
            "client: shop/checkout",
            "client: checkout",
            "client:",
            "polyfill[0].client: must be namespace/name",
        ),
        (
            "10.0.0.5:8000",
            '"[2001:db8::5]:8000"',
            "service:",
            "polyfill[0].service: must be an IPv4",
        ),
        ("10.0.0.5:8000", "10.0.0.5", "service:", "polyfill[0].service: must be ip:port"),
        (
            "{threshold: 0.5, mode: fast}",
            "{}",
            "set_parameters",
            "polyfill[0].set_parameters: must be a non-empty",
        ),
        (
            "mode: fast",
            "mode: [a]",
            "set_parameters",
            "polyfill[0].set_parameters.mode: must be a string",
        ),
        (
            "model: fraud",
            "modle: fraud",
            "modle",
            "polyfill[0].modle: unknown key (did you mean 'model'?)",
        ),
    ],
)
def test_bad_polyfill_names_line_and_field(old: str, new: str, needle: str, expected: str) -> None:
    text = POLYFILL.replace(old, new)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if needle in ln)
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "policy.yaml")
    assert any(m.startswith(f"policy.yaml:{line}: {expected}") for m in err.value.messages), (
        err.value.messages
    )


def test_missing_fields_and_duplicates() -> None:
    dup = "{client: shop/checkout, service: 10.0.0.5:8000, model: fraud, version: '2'"
    text = POLYFILL + f"  - {dup}, set_parameters: {{a: 1}}}}\n  - {{client: a/b}}\n"
    with pytest.raises(PolicyError) as err:
        load_policy_text(text, "policy.yaml")
    msgs = err.value.messages
    assert any("polyfill[1]: duplicate of polyfill[0]" in m for m in msgs), msgs
    for f in ("service", "model", "set_parameters"):
        assert any(f"polyfill[2].{f}: required" in m for m in msgs), msgs
