"""Mutual TLS for the control API over TCP, and who may change verdicts.

The API can block traffic, so over TCP it only speaks mutual TLS: the server proves itself with
server.pem, and every client must present a certificate signed by the CA in ca.pem (checked in
the handshake). Verdict-changing calls then also need a certificate identity, optionally one from
an allowed list. On the unix socket there is no TLS: the socket's mode (0600, root) is its
authentication.

A TLS directory holds, for the server: ca.pem, server.pem, server-key.pem; for a client: ca.pem,
client.pem, client-key.pem. `infertap certs dev-ca DIR` makes a development set.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc

from infertap.agent.api import infertap_pb2 as pb
from infertap.agent.errors import InfertapError

log = logging.getLogger(__name__)

CA_CERT: Final = "ca.pem"
SERVER_CERT: Final = "server.pem"
SERVER_KEY: Final = "server-key.pem"
CLIENT_CERT: Final = "client.pem"
CLIENT_KEY: Final = "client-key.pem"
DEV_FILES: Final = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
DEFAULT_CLIENT_NAME: Final = "infertap-client"
# Always in a development server certificate, so `--api 127.0.0.1:PORT` works out of the box.
LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")

_SERVICE: Final = pb.DESCRIPTOR.services_by_name["Control"]
# Calls that only read. Every other method of the service is treated as verdict-changing, so a
# new RPC added to the .proto is guarded until someone decides it is harmless (fail closed).
READ_ONLY_METHODS: Final = frozenset(
    f"/{_SERVICE.full_name}/{name}"
    for name in ("GetStatus", "ListFlows", "ListVerdicts", "ListModels", "StreamEvents")
)


class TlsError(InfertapError):
    """Missing or unusable TLS material, or TCP without TLS: printed as one line."""


def is_unix(address: str) -> bool:
    return address.startswith("unix:")


# ---- loading material ------------------------------------------------------------------------


def _read(tls_dir: Path, name: str) -> bytes:
    path = tls_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsError(
            f"{path}: no such file ('infertap certs dev-ca {tls_dir}' makes a development set)"
        ) from None
    except OSError as exc:
        raise TlsError(f"{path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{path}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTls:
    """What the API server needs for mutual TLS; loaded (and checked) before anything starts."""

    cert: bytes
    key: bytes
    ca: bytes  # signs the client certificates we accept
    allowed: frozenset[str] = frozenset()  # identities that may change verdicts; empty = any

    @classmethod
    def load(cls, tls_dir: Path, allowed: Iterable[str] = ()) -> ServerTls:
        return cls(
            cert=_read(tls_dir, SERVER_CERT),
            key=_read(tls_dir, SERVER_KEY),
            ca=_read(tls_dir, CA_CERT),
            allowed=frozenset(allowed),
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )


def server_tls_for(
    address: str, tls_dir: Path | None, allowed: Iterable[str] = ()
) -> ServerTls | None:
    """The TLS material a listener on `address` needs: None for a unix socket; for TCP it is
    required, and TlsError (one line) says how to fix it."""
    if is_unix(address):
        return None
    if tls_dir is None:
        raise TlsError(
            f"the API on TCP {address} needs mutual TLS: give --tls-dir DIR "
            f"({CA_CERT}, {SERVER_CERT}, {SERVER_KEY}) or use a unix:PATH socket"
        )
    return ServerTls.load(tls_dir, allowed)


@dataclass(frozen=True)
class ClientTls:
    """Where a client finds its material, and the name to check the server certificate for."""

    tls_dir: Path
    server_name: str | None = None  # overrides the host of the address (e.g. an IP not in SAN)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_dir, CA_CERT),
            private_key=_read(self.tls_dir, CLIENT_KEY),
            certificate_chain=_read(self.tls_dir, CLIENT_CERT),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def client_tls_for(
    address: str, tls_dir: Path | None, server_name: str | None = None
) -> ClientTls | None:
    """None for a unix socket (no TLS there); for TCP, TLS is required."""
    if is_unix(address):
        return None
    if tls_dir is None:
        raise TlsError(
            f"the API on TCP {address} needs mutual TLS: give --tls-dir DIR (or INFERTAP_TLS_DIR) "
            f"holding {CA_CERT}, {CLIENT_CERT} and {CLIENT_KEY}"
        )
    return ClientTls(tls_dir, server_name)


# ---- who may change verdicts -----------------------------------------------------------------


def peer_identities(context: grpc.ServicerContext) -> list[str]:
    """The caller's certificate identities (x509 common name and subject alternative names),
    or [] when the call did not come over TLS with a client certificate."""
    # grpc gives each property as a list of bytes (the stubs say bytes).
    auth: Mapping[str, Any] = context.auth_context()
    if list(auth.get("transport_security_type", [])) != [b"ssl"]:
        return []
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, []):
            text = value.decode("utf-8", "replace")
            if text and text not in names:
                names.append(text)
    return names


class VerdictGuard(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses (PERMISSION_DENIED) any call that is not read-only to a caller without an
    authenticated identity, and, when `allowed` is set, to an identity not in it.

    `local` is for the unix socket, whose file permissions already authenticate the caller.
    """

    def __init__(self, *, local: bool, allowed: frozenset[str] = frozenset()) -> None:
        self.local = local
        self.allowed = allowed

    def refusal(self, method: str, context: grpc.ServicerContext) -> str | None:
        """Why this call is refused, or None if it may go on."""
        if method in READ_ONLY_METHODS:
            return None
        names = peer_identities(context)
        if not names:
            if self.local:
                return None
            return "changing verdicts needs an authenticated client certificate"
        if self.allowed and not self.allowed.intersection(names):
            return f"client {names[0]!r} is not allowed to change verdicts"
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:  # type: ignore[type-arg]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in READ_ONLY_METHODS:
            return handler

        def guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                reason = self.refusal(method, context)
                if reason is not None:
                    log.warning("refused %s from %s: %s", method, context.peer(), reason)
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
                # An audit line: who changed verdicts, from where.
                who = ", ".join(peer_identities(context)) or "local"
                log.info("%s by %s (%s)", method.rpartition("/")[2], who, context.peer())
                return behavior(request, context)

            return guarded

        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(guard(handler.unary_unary), **codec)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(guard(handler.unary_stream), **codec)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(guard(handler.stream_unary), **codec)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(guard(handler.stream_stream), **codec)


# ---- a development CA --------------------------------------------------------------------------


def _check_dir(tls_dir: Path) -> None:
    """Make `tls_dir` 0700, or refuse one that others can read: it will hold private keys."""
    if not tls_dir.exists():
        tls_dir.mkdir(parents=True, mode=0o700)
        os.chmod(tls_dir, 0o700)  # mkdir's mode is filtered by the umask
        return
    st = tls_dir.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise TlsError(f"{tls_dir}: not a directory")
    if st.st_mode & 0o077:
        raise TlsError(
            f"{tls_dir}: others can open it (mode {stat.S_IMODE(st.st_mode):o}); "
            f"it will hold private keys: 'chmod 700 {tls_dir}' or name a new directory"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a new file created with its final mode, then rename over the target: a key
    is never, even for an instant, readable by others, and a crash leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_dev_ca(
    tls_dir: Path,
    server_names: Sequence[str] = (),
    *,
    client_name: str = DEFAULT_CLIENT_NAME,
    days: int = 365,
    force: bool = False,
) -> list[Path]:
    """A development CA and a server and a client certificate signed by it, in `tls_dir`.

    The CA's private key is not kept: nobody can mint more certificates from this directory (run
    again with force=True to reissue the whole set). Returns the files written.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise TlsError(f"--days must be at least 1, got {days}")
    _check_dir(tls_dir)
    existing = [name for name in DEV_FILES if (tls_dir / name).exists()]
    if existing and not force:
        raise TlsError(
            f"{tls_dir} already holds {', '.join(existing)}: give --force to replace them"
        )

    sans: list[x509.GeneralName] = []
    for name in [*server_names, *LOOPBACK_NAMES]:
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name)
        if general not in sans:
            sans.append(general)

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate a little clock skew
    not_after = now + datetime.timedelta(days=days)

    def subject(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "infertap development"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = subject("infertap development CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        cn: str, alt: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject(cn))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    server_cn = server_names[0] if server_names else "infertap-agent"
    server_cert, server_key = leaf(server_cn, sans, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = leaf(
        client_name, [x509.DNSName(client_name)], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    contents = {
        CA_CERT: (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        SERVER_CERT: (server_cert, 0o644),
        SERVER_KEY: (server_key, 0o600),
        CLIENT_CERT: (client_cert, 0o644),
        CLIENT_KEY: (client_key, 0o600),
    }
    written = []
    for name, (data, mode) in contents.items():
        _write(tls_dir / name, data, mode)
        written.append(tls_dir / name)
    return written
