"""`run --sample-bytes/--sample-one-in` and the policy's `sampling:` agree: a flag given wins over
the policy (reloads included), the policy wins over the default. Checked on the samples the kernel
sends up over real interception, and on what the kernel's config map holds (`status --json`)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import INFERTAP, Recorder, needs_root, start_agent, start_client, start_server

pytestmark = [needs_root, pytest.mark.kernel]


@pytest.fixture(scope="module")
def pods(lab: Any) -> tuple[Any, Any]:
    return lab.add_pod("sf-client"), lab.add_pod("sf-server")


def test_flags_win_over_the_policy_on_the_wire_and_after_a_reload(
    pods: tuple[Any, Any], tmp_path: Path, make_agent: Callable[..., Any]
) -> None:

    client, server = pods
    policy = tmp_path / "policy.yaml"
    # The policy asks for no sampling at all and 2 KiB: the flags say every flow, 512 bytes.
    policy.write_text("version: 1\nsampling: {sample_bytes: 2048, sample_one_in: 0}\n")
    agent = make_agent(
        cgroups=(str(client.cgroup), str(server.cgroup)),
        policy=policy,
        sample_bytes=512,
        sample_one_in=1,
    )
    rec = Recorder()
    agent.pipeline.add_sink(rec)
    reloads = agent.events.subscribe(frozenset({"policy"}))
    try:
        assert agent.sensor.sampling() == (512, 1)
        start_server(server, 8401)
        peer = start_client(client, server.ip, 8401)
        assert peer.cmd("send 1500 1") == "ok 1500"
        first = rec.wait_for(lambda: [s for s in rec.samples if s.msg_len == 1500])
        assert len(first[0].data) == 512 and first[0].truncated

        # A reload with other sampling values changes nothing the flags set.
        policy.write_text("version: 1\nsampling: {sample_bytes: 3000, sample_one_in: 0}\n")
        deadline = time.monotonic() + 10
        got = None
        while got is None and time.monotonic() < deadline:
            got = reloads.get(timeout=0.5)
        assert got is not None and got.kind == "policy", "the policy was not reloaded"
        assert agent.sensor.sampling() == (512, 1)
        assert peer.cmd("send 2500 2") == "ok 2500"
        second = rec.wait_for(lambda: [s for s in rec.samples if s.msg_len == 2500])
        assert len(second[0].data) == 512
        peer.close()
    finally:
        agent.stop()


def _status(api: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*INFERTAP, "status", "--json", "--api", f"unix:{api}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def test_cli_flag_not_given_leaves_the_policy_in_force(
    pods: tuple[Any, Any], tmp_path: Path
) -> None:
    client, _server = pods
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nsampling: {sample_bytes: 1024, sample_one_in: 3}\n")
    for extra, want in (([], (1024, 3)), (["--sample-bytes", "256"], (256, 3))):
        api = tmp_path / f"api{len(extra)}.sock"
        proc = start_agent([client.cgroup], api, ["--policy", str(policy), *extra])
        try:
            st = _status(api)
            assert (st["sample_bytes"], st["sample_one_in"]) == want, (extra, st)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
