"""The policy's `routes:` section: parsing, normalization, hash, errors naming line and field."""

from __future__ import annotations

import textwrap

import pytest

from infertap.agent.flows.records import Endpoint
from infertap.agent.kernel.steering import Backend, Route, route_problems
from infertap.agent.policy.loader import PolicyError, load_policy_text, render_policy

ROUTES = textwrap.dedent(
    """\
    version: 1
    routes:
      - service: 10.0.0.200:80
        backends:
          - {endpoint: 10.0.0.3:8001, weight: 10}
          - {endpoint: 10.0.0.2:8000, weight: 90}
      - service: "[2001:db8::c8]:443"
        backends:
          - endpoint: "[2001:db8::2]:8443"
            weight: 1
    """
)


def line_of(text: str, needle: str, nth: int = 1) -> int:
    lines = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    return lines[nth - 1]


def test_routes_load_normalized() -> None:
    p = load_policy_text(ROUTES, "policy.yaml")
    assert p.routes == (
        Route(
            Endpoint("10.0.0.200", 80),
            (Backend(Endpoint("10.0.0.2", 8000), 90), Backend(Endpoint("10.0.0.3", 8001), 10)),
        ),
        Route(Endpoint("2001:db8::c8", 443), (Backend(Endpoint("2001:db8::2", 8443), 1),)),
    )
    assert all(route_problems(r) == [] for r in p.routes)  # what the loader admits, steering takes


def test_render_loads_back_and_hash_covers_routes() -> None:
    p = load_policy_text(ROUTES, "policy.yaml")
    again = load_policy_text(render_policy(p), "shown.yaml")
    assert again == p and again.hash == p.hash
    # Backend order does not change the split, so it does not change the hash either.
    swapped = ROUTES.replace("10.0.0.3:8001, weight: 10", "X").replace(
        "10.0.0.2:8000, weight: 90", "10.0.0.3:8001, weight: 10"
    )
    swapped = swapped.replace("X", "10.0.0.2:8000, weight: 90")
    assert load_policy_text(swapped).hash == p.hash
    # A weight is an effective setting.
    assert load_policy_text(ROUTES.replace("weight: 10}", "weight: 20}")).hash != p.hash
    # A policy without routes keeps the hash it had before routes existed: no `routes` key.
    plain = load_policy_text("version: 1\n")
    assert load_policy_text("version: 1\nroutes: []\n").hash == plain.hash
    assert "routes" not in render_policy(plain)


def test_ipv4_mapped_service_is_ipv4() -> None:
    text = (
        "version: 1\nroutes:\n  - service: '[::ffff:10.0.0.9]:80'\n"
        "    backends: [{endpoint: 10.0.0.2:80, weight: 1}]\n"
    )
    assert load_policy_text(text).routes[0].service == Endpoint("10.0.0.9", 80)


ROUTE_HEAD = "version: 1\nroutes:\n  - service: 10.0.0.200:80\n    backends:\n"


@pytest.mark.parametrize(
    ("text", "needle", "expected"),
    [
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:8000, weight: 0}\n",
            "weight: 0",
            "routes[0].backends[0].weight: must be an integer from 1 to 1000000",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:8000, weight: 2.5}\n",
            "weight: 2.5",
            "routes[0].backends[0].weight: must be an integer from 1 to 1000000",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:8000, weight: yes}\n",
            "weight: yes",
            "routes[0].backends[0].weight: must be an integer from 1 to 1000000",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:8000}\n",
            "endpoint",
            "routes[0].backends[0].weight: required",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2, weight: 1}\n",
            "endpoint",
            "routes[0].backends[0].endpoint: must be ip:port with a port from 1 to 65535"
            " ([ip]:port for IPv6)",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:70000, weight: 1}\n",
            "endpoint",
            "routes[0].backends[0].endpoint: must be ip:port with a port from 1 to 65535"
            " ([ip]:port for IPv6)",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: '2001:db8::2:80', weight: 1}\n",
            "endpoint",
            "routes[0].backends[0].endpoint: must be ip:port with a port from 1 to 65535"
            " ([ip]:port for IPv6)",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: '[2001:db8::2]:80', weight: 1}\n",
            "endpoint",
            "routes[0].backends[0].endpoint: must be in the service's address family",
        ),
        (
            ROUTE_HEAD
            + "      - {endpoint: 10.0.0.2:8000, weight: 1}\n"
            + "      - {endpoint: 10.0.0.2:8000, weight: 2}\n",
            "weight: 2",
            "routes[0].backends[1].endpoint: duplicate of routes[0].backends[0]",
        ),
        (
            ROUTE_HEAD
            + "      - {endpoint: 10.0.0.2:8000, weight: 1000000}\n"
            + "      - {endpoint: 10.0.0.3:8000, weight: 1}\n",
            "backends:",
            "routes[0].backends: weights add up to 1000001, more than 1000000",
        ),
        (
            ROUTE_HEAD
            + "".join(f"      - {{endpoint: 10.0.0.{i}:80, weight: 1}}\n" for i in range(9)),
            "backends:",
            "routes[0].backends: must list 1 to 8 backends",
        ),
        (
            "version: 1\nroutes:\n  - service: 10.0.0.200:80\n    backends: []\n",
            "backends",
            "routes[0].backends: must list 1 to 8 backends",
        ),
        (
            "version: 1\nroutes:\n  - service: 10.0.0.200:80\n",
            "service",
            "routes[0].backends: required",
        ),
        (
            "version: 1\nroutes:\n  - backends: [{endpoint: 10.0.0.2:80, weight: 1}]\n",
            "backends",
            "routes[0].service: required",
        ),
        (
            "version: 1\nroutes:\n  - service: vip:80\n"
            "    backends: [{endpoint: 10.0.0.2:80, weight: 1}]\n",
            "service",
            "routes[0].service: must be ip:port with a port from 1 to 65535 ([ip]:port for IPv6)",
        ),
        (
            "version: 1\nroutes:\n"
            "  - {service: 10.0.0.200:80, backends: [{endpoint: 10.0.0.2:80, weight: 1}]}\n"
            "  - {service: 10.0.0.200:80, backends: [{endpoint: 10.0.0.3:80, weight: 1}]}\n",
            "10.0.0.3",
            "routes[1].service: duplicate of routes[0]",
        ),
        (
            ROUTE_HEAD + "      - {endpoint: 10.0.0.2:8000, weight: 1, zone: a}\n",
            "zone",
            "routes[0].backends[0].zone: unknown key; known: endpoint, weight",
        ),
        (
            "version: 1\nroutes:\n  service: 10.0.0.200:80\n",
            "service",  # like every section: the line where the mapping starts
            "routes: must be a list",
        ),
    ],
)
def test_bad_routes_name_line_and_field(text: str, needle: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    assert info.value.messages == [f"policy.yaml:{line_of(text, needle)}: {expected}"]


def test_every_bad_route_is_reported() -> None:
    text = ROUTE_HEAD + (
        "      - {endpoint: 10.0.0.2:8000, weight: -1}\n      - {endpoint: 10.0.0.3, weight: 1}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, "policy.yaml")
    assert info.value.messages == [
        "policy.yaml:5: routes[0].backends[0].weight: must be an integer from 1 to 1000000",
        "policy.yaml:6: routes[0].backends[1].endpoint: must be ip:port with a port from 1 to"
        " 65535 ([ip]:port for IPv6)",
    ]


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        (Route(Endpoint("10.0.0.1", 80), ()), "1 to 8 backends"),
        (Route(Endpoint("10.0.0.1", 80), (Backend(Endpoint("10.0.0.2", 80), 0),)), "weight"),
        (Route(Endpoint("10.0.0.1", 80), (Backend(Endpoint("10.0.0.2", 80), True),)), "weight"),
        (Route(Endpoint("10.0.0.1", 80), (Backend(Endpoint("::1", 80), 1),)), "address family"),
        (Route(Endpoint("nope", 80), (Backend(Endpoint("10.0.0.2", 80), 1),)), "not an IP"),
        (Route(Endpoint("10.0.0.1", 0), (Backend(Endpoint("10.0.0.2", 80), 1),)), "port"),
    ],
)
def test_route_problems_for_direct_callers(route: Route, problem: str) -> None:
    """Steering.set_routes checks routes that do not come from a policy file, too."""
    assert any(problem in p for p in route_problems(route)), route_problems(route)
