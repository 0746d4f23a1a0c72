"""The ring a flow goes to (agent/kernel/rings.py, the mirror of bpf/intercept.c ring_for)."""

from __future__ import annotations

from infertap.agent.kernel import rings


def test_ring_for_is_the_same_from_both_ends() -> None:
    for n in range(1, 9):
        for a, b in ((("10.0.0.1", 41000), ("10.0.0.2", 8000)), (("fd00::1", 5), ("fd00::2", 6))):
            assert rings.ring_for(a, b, n) == rings.ring_for(b, a, n)
            assert 0 <= rings.ring_for(a, b, n) < n
    assert rings.ring_for(("10.0.0.1", 1), ("10.0.0.2", 2), 1) == 0


def test_ring_for_spreads_connections() -> None:
    got = [rings.ring_for(("10.0.0.1", 40000 + i), ("10.0.0.2", 8000), 2) for i in range(64)]
    assert 16 < got.count(0) < 48
