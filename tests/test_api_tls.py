"""The control API over TCP: mutual TLS only, and verdict changes only from an identified caller.

No kernel here: the real ApiServer serves a small stand-in agent, because the unit under test is
the transport security, not the data path. Certificates come from the dev CA (`certs dev-ca`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.api import infertap_pb2_grpc as pb_grpc
from infertap.agent.api.client import AgentUnreachable, connect
from infertap.agent.api.port import AgentStatus, FlowRow, ModelsView
from infertap.agent.api.server import ApiServer
from infertap.agent.api.tls import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    DEV_FILES,
    READ_ONLY_METHODS,
    SERVER_CERT,
    SERVER_KEY,
    TlsError,
    VerdictGuard,
    make_dev_ca,
)
from infertap.agent.enforce.verdicts import Verdict, unblocked
from infertap.agent.export.event_hub import EventHub, Subscription
from infertap.agent.flows.records import Endpoint

INFERTAP = [sys.executable, "-m", "infertap.cli.main"]
SERVICE = pb.Target(service=pb.Endpoint(ip="10.0.0.7", port=8000))


@dataclass
class FakeVerdicts:
    """The API's verdict port over a dict, announcing each change as the agent's does."""

    blocked: dict[Endpoint, Verdict] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)

    def block_flow(self, flow_id: int, reason: str = "") -> Verdict | None:
        raise AssertionError("no flows here: the servicer answers NOT_FOUND first")

    def unblock_flow(self, flow_id: int) -> Verdict | None:
        return None

    def block_service(self, service: Endpoint, reason: str = "") -> Verdict | None:
        if service in self.blocked:
            return None
        v = Verdict("service", 0, service, "block", reason, 0.0)
        self.blocked[service] = v
        self.published.append(v.describe())
        return v

    def unblock_service(self, service: Endpoint) -> Verdict | None:
        v = self.blocked.pop(service, None)
        if v is not None:
            self.published.append(unblocked(v))
        return v

    def list(self) -> list[Verdict]:
        return list(self.blocked.values())


class FakeAgent:
    """The ControlPort (agent/api/port.py) the servicer reads, without a kernel."""

    def __init__(self) -> None:
        self.verdicts = FakeVerdicts()
        self.hub = EventHub()

    @property
    def published(self) -> list[str]:
        return self.verdicts.published

    def status(self) -> AgentStatus:
        return AgentStatus(
            ready=True,
            mode="node",
            cgroups=["/"],
            ports=[8000],
            kernel_stats={"flows_seen": 3},
            flows_active=0,
            headers="",
        )

    def flow_rows(self) -> list[FlowRow]:
        return []

    def models(self) -> ModelsView:
        return ModelsView()

    def subscribe(self, kinds: frozenset[str]) -> Subscription:
        return self.hub.subscribe(kinds)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tls") / "dev"
    make_dev_ca(d, ["agent.test"])
    return d


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA: its certificates must be worth nothing to our server."""
    d = tmp_path_factory.mktemp("tls") / "other"
    make_dev_ca(d)
    return d


@dataclass
class Running:
    agent: FakeAgent
    address: str


@contextmanager
def serve(address: str, tls_dir: Path | None, allowed: tuple[str, ...] = ()) -> Iterator[Running]:
    agent = FakeAgent()
    server = ApiServer(agent, address, tls_dir, allowed)
    server.start()
    try:
        yield Running(agent, f"127.0.0.1:{server.port}" if server.port else address)
    finally:
        server.stop()


@pytest.fixture
def tls_server(certs: Path) -> Iterator[Running]:
    with serve("127.0.0.1:0", certs) as running:
        yield running


def channel_with(ca: Path, key: Path | None, cert: Path | None, address: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, creds)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERTAP_")}
    return subprocess.run([*INFERTAP, *args], capture_output=True, text=True, timeout=60, env=env)


def one_line_error(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert words.lower() in r.stderr.lower(), r.stderr


# ---- the handshake ---------------------------------------------------------------------------


def test_client_with_the_right_certificates_reads_and_changes_verdicts(
    tls_server: Running, certs: Path
) -> None:
    channel, stub = connect(tls_server.address, tls_dir=certs)
    with channel:
        st = stub.GetStatus(pb.StatusRequest(), timeout=5)
        assert st.ready and st.mode == "node" and st.kernel_stats["flows_seen"] == 3
        reply = stub.Block(SERVICE, timeout=5)
        assert reply.changed and "10.0.0.7" in reply.description
        assert [v.reason for v in stub.ListVerdicts(pb.ListVerdictsRequest()).verdicts] == ["api"]
        assert stub.Unblock(SERVICE, timeout=5).changed
    assert tls_server.agent.verdicts.blocked == {}
    assert len(tls_server.agent.published) == 2


def test_client_without_a_certificate_is_rejected_in_the_handshake(
    tls_server: Running, certs: Path
) -> None:
    with channel_with(certs / CA_CERT, None, None, tls_server.address) as channel:
        stub = pb_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        for call, request in ((stub.GetStatus, pb.StatusRequest()), (stub.Block, SERVICE)):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_server.agent.verdicts.blocked == {}


def test_client_certificate_from_another_ca_is_rejected(
    tls_server: Running, certs: Path, other_certs: Path
) -> None:
    # It trusts our server (right ca.pem) but presents a certificate our CA never signed.
    with channel_with(
        certs / CA_CERT, other_certs / CLIENT_KEY, other_certs / CLIENT_CERT, tls_server.address
    ) as channel:
        stub = pb_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.Block(SERVICE, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tls_server.agent.verdicts.blocked == {}


def test_client_refuses_a_server_from_another_ca(tls_server: Running, other_certs: Path) -> None:
    with pytest.raises(AgentUnreachable, match="over TLS"):
        connect(tls_server.address, timeout_s=1.0, tls_dir=other_certs)


def test_plain_text_to_the_tls_port_fails(tls_server: Running) -> None:
    with grpc.insecure_channel(tls_server.address) as channel:
        stub = pb_grpc.ControlStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            stub.GetStatus(pb.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_server_name_is_checked_and_can_be_overridden(tls_server: Running, certs: Path) -> None:
    # The certificate names agent.test and the loopback addresses, not wrong.test.
    with pytest.raises(AgentUnreachable):
        connect(tls_server.address, timeout_s=1.0, tls_dir=certs, server_name="wrong.test")
    channel, stub = connect(tls_server.address, tls_dir=certs, server_name="agent.test")
    with channel:
        assert stub.GetStatus(pb.StatusRequest(), timeout=5).ready


# ---- refusing to run without TLS ---------------------------------------------------------------


def test_tcp_listener_without_tls_material_is_refused(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(TlsError) as err:
        ApiServer(FakeAgent(), "127.0.0.1:0")
    text = str(err.value)
    assert "\n" not in text and "--tls-dir" in text and "unix:" in text
    for name in (CA_CERT, SERVER_CERT):  # a set without its key
        (tmp_path / name).write_bytes((certs / name).read_bytes())
    with pytest.raises(TlsError, match=SERVER_KEY.replace(".", r"\.")):
        ApiServer(FakeAgent(), "127.0.0.1:0", tmp_path)


def test_cli_run_on_tcp_without_tls_is_one_line() -> None:
    # Refused before the agent loads or attaches anything, so this needs no root.
    one_line_error(run_cli("run", "--api", "127.0.0.1:0"), "needs mutual TLS")


def test_cli_client_on_tcp_without_tls_is_one_line() -> None:
    one_line_error(run_cli("status", "--api", "127.0.0.1:1"), "--tls-dir")


def test_cli_client_with_missing_material_names_the_file(tmp_path: Path) -> None:
    r = run_cli("flows", "--api", "127.0.0.1:1", "--tls-dir", str(tmp_path))
    one_line_error(r, CA_CERT)


def test_unix_socket_is_unchanged_no_tls_and_mode_0600(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "api.sock"
    with serve(f"unix:{sock}", None) as running:
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        channel, stub = connect(running.address)
        with channel:
            # The socket's permissions authenticate the caller: verdicts may change.
            assert stub.Block(SERVICE, timeout=5).changed


# ---- who may change verdicts ---------------------------------------------------------------------


def test_only_allowed_identities_change_verdicts(certs: Path) -> None:
    with serve("127.0.0.1:0", certs, allowed=("ops-team",)) as running:
        channel, stub = connect(running.address, tls_dir=certs)  # CN infertap-client
        with channel:
            assert stub.GetStatus(pb.StatusRequest(), timeout=5).ready  # reading is fine
            for call in (stub.Block, stub.Unblock):
                with pytest.raises(grpc.RpcError) as err:
                    call(SERVICE, timeout=5)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "infertap-client" in (err.value.details() or "")
        assert running.agent.verdicts.blocked == {} and running.agent.published == []
    with serve("127.0.0.1:0", certs, allowed=("infertap-client",)) as running:
        channel, stub = connect(running.address, tls_dir=certs)
        with channel:
            assert stub.Block(SERVICE, timeout=5).changed


class FakeContext:
    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def test_guard_refuses_a_caller_without_an_identity() -> None:
    block = "/infertap.v1.Control/Block"
    plain = FakeContext({"transport_security_type": [b"insecure"]})
    tls_no_cert = FakeContext({"transport_security_type": [b"ssl"]})
    tls_cert = FakeContext(
        {"transport_security_type": [b"ssl"], "x509_common_name": [b"infertap-client"]}
    )
    remote = VerdictGuard(local=False)
    assert remote.refusal(block, plain) is not None  # type: ignore[arg-type]
    assert remote.refusal(block, tls_no_cert) is not None  # type: ignore[arg-type]
    assert remote.refusal(block, tls_cert) is None  # type: ignore[arg-type]
    assert remote.refusal("/infertap.v1.Control/GetStatus", plain) is None  # type: ignore[arg-type]
    assert VerdictGuard(local=True).refusal(block, plain) is None  # type: ignore[arg-type]


def test_every_rpc_not_listed_read_only_is_guarded() -> None:
    # Fail closed: a new RPC is guarded unless added to READ_ONLY_METHODS on purpose.
    service = pb.DESCRIPTOR.services_by_name["Control"]
    methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert methods >= READ_ONLY_METHODS
    assert {m.rpartition("/")[2] for m in methods - READ_ONLY_METHODS} == {"Block", "Unblock"}


# ---- the CLI -----------------------------------------------------------------------------------


def test_cli_dev_ca_writes_private_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    r = run_cli("certs", "dev-ca", str(d), "--server-name", "10.1.2.3", "--days", "7")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert sorted(p.name for p in d.iterdir()) == sorted(DEV_FILES)  # no CA key kept
    for name in DEV_FILES:
        mode = stat.S_IMODE((d / name).stat().st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), (name, oct(mode))
    before = (d / CLIENT_KEY).read_bytes()
    one_line_error(run_cli("certs", "dev-ca", str(d)), "--force")
    assert (d / CLIENT_KEY).read_bytes() == before
    assert run_cli("certs", "dev-ca", str(d), "--force").returncode == 0
    assert (d / CLIENT_KEY).read_bytes() != before
    assert stat.S_IMODE((d / CLIENT_KEY).stat().st_mode) == 0o600


def test_cli_dev_ca_refuses_a_directory_others_can_read(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    one_line_error(run_cli("certs", "dev-ca", str(d)), "chmod 700")
    assert list(d.iterdir()) == []


def test_cli_status_and_block_over_mutual_tls(tls_server: Running, certs: Path) -> None:
    api = ["--api", tls_server.address, "--tls-dir", str(certs)]
    r = run_cli("status", *api)
    assert r.returncode == 0, r.stderr
    assert "ready, node mode" in r.stdout and "flows_seen" in r.stdout
    r = run_cli("block", "--service", "10.0.0.9:443", *api)
    assert r.returncode == 0, r.stderr
    assert "block service 10.0.0.9:443" in r.stdout
    assert Endpoint("10.0.0.9", 443) in tls_server.agent.verdicts.blocked
