"""TLS for every link: a local certificate authority (`tierwise certs init`, with
`cryptography`), the server side for uvicorn, and the client side for httpx.

A self-contained set-up has no public CA to lean on, so `init_certs` makes one: a CA key and
certificate, a server certificate for the hosts the tier servers answer on (IP addresses and
DNS names in its subjectAltName, as RFC 6125 clients check), and one client certificate per
device for mutual TLS — the per-device X.509 identity of AWS IoT Greengrass. Keys are ECDSA
P-256 (what every TLS stack takes), certificates X.509 v3 with the extensions RFC 5280 asks
of a CA and of end entities. Private keys are written readable by their owner only.

Servers take `tls.cert`/`tls.key` (and with `tls.client_ca`, require a client certificate
signed by it); clients, subscribers and the telemetry sender verify servers against `tls.ca`
and present `tls.client_cert`/`tls.client_key` where given. With `tls.ca` empty, links are
plain HTTP (the default on loopback).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierwise.config import TlsConfig

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
VALID_DAYS = 825  # the most the CA/Browser Forum allowed server certificates until 2020


@dataclass
class IssuedFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    devices: dict[str, tuple[Path, Path]]  # device id -> (certificate, key)


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    from tierwise.registry.signing import write_private

    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))


def _write_cert(path: Path, cert: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tierwise"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, public_key: Any, ca_cert: Any, ca_key: Any, *, is_ca: bool = False,
           hosts: list[str] | None = None, client: bool = False) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(ca_cert.subject if ca_cert is not None else _name(subject))
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)
    if hosts:
        names: list[Any] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def init_certs(directory: Path, hosts: list[str], devices: list[str],
               overwrite: bool = False) -> IssuedFiles:
    """A CA, a server certificate for `hosts` and a client certificate per device id, under
    `directory`. An existing CA is kept (and signs the new certificates) unless `overwrite`,
    so devices can be added later; FileExistsError names nothing, it never replaces a CA
    silently."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tierwise.registry.subscriber import check_device_id

    if not hosts:
        raise ValueError("hosts: expected at least one host name or IP address the servers "
                         "answer on, e.g. 127.0.0.1")
    for device in devices:
        check_device_id(device)
    directory = Path(directory)
    ca_path, ca_key_path = directory / CA_FILE, directory / CA_KEY_FILE
    if ca_path.is_file() and ca_key_path.is_file() and not overwrite:
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = _key()
        ca_cert = _issue("tierwise local CA", ca_key.public_key(), None, ca_key, is_ca=True)
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_path, ca_cert)
    server_key = _key()
    _write_key(directory / SERVER_KEY_FILE, server_key)
    _write_cert(directory / SERVER_FILE, _issue(hosts[0], server_key.public_key(), ca_cert,
                                                ca_key, hosts=hosts))
    issued = {}
    for device in devices:
        key = _key()
        cert_path, key_path = directory / f"device-{device}.pem", directory / f"device-{device}.key"
        _write_key(key_path, key)
        _write_cert(cert_path, _issue(device, key.public_key(), ca_cert, ca_key, client=True))
        issued[device] = (cert_path, key_path)
    return IssuedFiles(ca_path, directory / SERVER_FILE, directory / SERVER_KEY_FILE, issued)


def client_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """What a client verifies servers with (and, for mutual TLS, presents); None: plain
    HTTP. Raises FileNotFoundError naming a missing file."""
    if not tls.ca:
        return None
    _require(tls.ca, "tls.ca")
    context = ssl.create_default_context(cafile=tls.ca)
    if tls.client_cert:
        _require(tls.client_cert, "tls.client_cert")
        _require(tls.client_key, "tls.client_key")
        context.load_cert_chain(tls.client_cert, tls.client_key)
    return context


def scheme(tls: TlsConfig) -> str:
    return "https" if tls.ca else "http"


def server_options(tls: TlsConfig) -> dict[str, Any]:
    """uvicorn.Config keyword arguments for a TLS server (empty without `tls.cert`)."""
    if not tls.cert:
        return {}
    _require(tls.cert, "tls.cert")
    _require(tls.key, "tls.key")
    options: dict[str, Any] = {"ssl_certfile": tls.cert, "ssl_keyfile": tls.key}
    if tls.client_ca:
        _require(tls.client_ca, "tls.client_ca")
        options.update(ssl_ca_certs=tls.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def _require(path: str, field: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{field}: {path}: no such file (`tierwise certs init` makes "
                                "a CA, a server certificate and device certificates)")
