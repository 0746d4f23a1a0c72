"""Bad input a user can give gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import IS_ROOT, needs_root

INFERTAP = [sys.executable, "-m", "infertap.cli.main"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INFERTAP, *args], capture_output=True, text=True, timeout=60, env=env)


def assert_one_clear_line(r: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    assert words.lower() in (r.stderr + r.stdout).lower(), r.stderr


def test_no_agent_running(tmp_path: Path) -> None:
    r = run("flows", "--api", f"unix:{tmp_path}/none.sock")
    assert_one_clear_line(r, 1, "no agent is running")
    assert len(r.stderr.strip().splitlines()) == 1


def test_block_needs_exactly_one_target(tmp_path: Path) -> None:
    assert_one_clear_line(run("block", "--api", f"unix:{tmp_path}/x"), 1, "exactly one")
    r = run("block", "--service", "1.2.3.4:80", "--flow", "3", "--api", f"unix:{tmp_path}/x")
    assert_one_clear_line(r, 1, "exactly one")


@pytest.mark.parametrize(
    "service", ["nonsense", "10.0.0.1", "10.0.0.1:0", "999.1.1.1:80", "h:99999"]
)
def test_block_rejects_a_malformed_service(service: str, tmp_path: Path) -> None:
    assert_one_clear_line(
        run("block", "--service", service, "--api", f"unix:{tmp_path}/x"), 1, "--service"
    )


def test_port_out_of_range_is_a_usage_error() -> None:
    r = run("run", "--port", "70000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "65535" in r.stderr  # names the allowed range


def test_unknown_flag_is_a_usage_error() -> None:
    r = run("flows", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_bad_metrics_address() -> None:
    assert_one_clear_line(run("run", "--metrics-addr", "localhost"), 1, "HOST:PORT")


def test_unknown_capture_is_one_line() -> None:
    assert_one_clear_line(run("run", "--capture", "xdp"), 1, "--capture must be one of skb, sk_msg")


def test_bad_otlp_endpoint() -> None:
    assert_one_clear_line(run("run", "--otlp-endpoint", "collector"), 1, "--otlp-endpoint")


@needs_root
def test_unknown_cgroup_is_refused_and_nothing_stays_attached(tmp_path: Path) -> None:
    r = run(
        "run",
        "--cgroup",
        "/no/such/cgroup",
        "--api",
        f"unix:{tmp_path}/a.sock",
        "--metrics-addr",
        "127.0.0.1:0",
    )
    assert_one_clear_line(r, 1, "does not exist")


@needs_root
@pytest.mark.kernel
def test_metrics_port_in_use_fails_cleanly(lab: object, tmp_path: Path) -> None:
    import socket

    cg = lab.pods["client"].cgroup  # type: ignore[attr-defined]

    def ours() -> int:
        out = subprocess.run(
            ["bpftool", "-j", "cgroup", "show", str(cg)], capture_output=True, text=True
        ).stdout
        return out.count("itap_sockops")

    before = ours()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run(
            "run",
            "--cgroup",
            str(cg),
            "--api",
            f"unix:{tmp_path}/a.sock",
            "--metrics-addr",
            f"127.0.0.1:{port}",
        )
    assert_one_clear_line(r, 1, f"127.0.0.1:{port} is already in use by pid {os.getpid()}")
    assert ours() == before  # the failed agent detached what it had attached


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root to drop it")
def test_metrics_port_taken_by_another_user_names_the_owner(tmp_path: Path) -> None:
    """Any local user can bind 127.0.0.1:9464 before the agent: `run` then fails with one line
    naming who holds the port (from /proc/net/tcp and /proc/*/fd), before it loads anything."""
    squatter = subprocess.Popen(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert squatter.stdout is not None
        port = int(squatter.stdout.readline())
        name = Path(f"/proc/{squatter.pid}/comm").read_text().strip()  # setpriv exec'd python
        r = run("run", "--api", f"unix:{tmp_path}/a.sock", "--metrics-addr", f"127.0.0.1:{port}")
    finally:
        assert squatter.stdin is not None
        squatter.stdin.close()
        squatter.wait(timeout=10)
    assert_one_clear_line(
        r, 1, f"127.0.0.1:{port} is already in use by pid {squatter.pid} ({name}, uid 65534)"
    )
    assert len(r.stderr.strip().splitlines()) == 1
    assert "ready" not in r.stdout  # it never got as far as attaching


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None, reason="needs root to drop it")
def test_missing_privileges_is_one_line() -> None:
    env = dict(os.environ)
    r = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *INFERTAP,
            "run",
            "--api",
            "unix:/tmp/infertap-nobody.sock",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert_one_clear_line(r, 1, "needs root")


BAD_POLICY = """version: 1
services:
  - {name: a, port: 8000}
drift:
  thresholds:
    psi: {warn: 0.3, alert: 0.2}
sampling: {sample_bites: 10}
"""


def test_policy_validate_names_lines_and_fields(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(BAD_POLICY)
    r = run("policy", "validate", str(f))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "policy.yaml:6" in r.stderr and "psi" in r.stderr
    assert "policy.yaml:7" in r.stderr and "sample_bites" in r.stderr
    f.write_text("version: 1\nservices:\n  - {name: a, port: 8000}\n")
    r = run("policy", "validate", str(f))
    assert r.returncode == 0 and "ok, policy" in r.stdout


@needs_root
def test_run_with_a_bad_policy_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(BAD_POLICY)
    r = run(
        "run",
        "--policy",
        str(f),
        "--api",
        f"unix:{tmp_path}/a.sock",
        "--metrics-addr",
        "127.0.0.1:0",
    )
    assert_one_clear_line(r, 1, "policy.yaml:6")
    assert len(r.stderr.strip().splitlines()) == 1


def test_baseline_build_and_show(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n" + "\n".join(f"{i},{i % 7}" for i in range(200)) + "\n")
    out = tmp_path / "m.json"
    r = run("baseline", "build", str(csv), "--model", "m", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    r = run("baseline", "show", str(out))
    assert r.returncode == 0 and "model m" in r.stdout and "a, b" in r.stdout
    assert_one_clear_line(run("baseline", "show", str(csv)), 1, "")
    assert_one_clear_line(
        run("baseline", "build", str(tmp_path / "none.csv"), "--model", "m"), 1, "no such file"
    )


def _user_errors() -> list[Exception]:
    from infertap.agent.inspect.baseline import BaselineError
    from infertap.agent.kernel.cgroups import CgroupError
    from infertap.agent.kernel.headers import HeadersNotFound
    from infertap.agent.kernel.steering import SteeringError
    from infertap.agent.policy.loader import PolicyError

    return [
        SteeringError("could not compile or load the steering programs: no space"),
        BaselineError("baseline.json", ["not a baseline"]),
        CgroupError("cgroup /nope does not exist under /sys/fs/cgroup"),
        HeadersNotFound("no kernel headers for 6.18"),
        PolicyError(["p.yaml:3: routes: first", "p.yaml:4: routes: second"]),
    ]


@pytest.mark.parametrize("error", _user_errors(), ids=lambda e: type(e).__name__)
def test_every_user_error_is_one_line_and_exit_1(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() catches InfertapError as a whole: a SteeringError raised while `run` starts (which
    printed a traceback before) is one line like the rest."""
    from infertap.agent.errors import InfertapError
    from infertap.cli import main as cli_main

    assert isinstance(error, InfertapError)

    def failing_app() -> None:
        raise error

    monkeypatch.setattr(cli_main, "app", failing_app)
    with pytest.raises(SystemExit) as exit_:
        cli_main.main()
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert captured.err.strip().splitlines() == [f"infertap: error: {error}"]
