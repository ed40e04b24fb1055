"""A throwaway certificate authority for the TLS tests, made with ``cryptography``.

Tests need certificates they control: one CA that the client trusts, a second
one it does not, and leaf certificates for 127.0.0.1 / localhost or for some
other name. Keys are EC P-256 (quick to make); everything is written as PEM
files that twistd's ``ssl:`` endpoint and ``--ca-file`` read.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.testing import StringTransport

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


class _TCPTransport(StringTransport):
    """A string transport that also takes the TCP options a client sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def speaks_tls(factory: IProtocolFactory, port: int) -> bool:
    """Complete a client connection a memory reactor recorded: does the client open
    with a TLS handshake record (0x16) rather than an HTTP request line?"""
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
    assert protocol is not None
    transport = _TCPTransport()
    protocol.makeConnection(transport)
    first = transport.value()
    assert first, "the client sent nothing"
    return bool(first[:1] == b"\x16")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Leaf:
    """A server's certificate and key, as files."""

    cert: Path
    key: Path

    def listen(self, port: int) -> str:
        """The twistd endpoint that serves TLS only on 127.0.0.1:``port`` with this certificate."""
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"


@dataclass
class CA:
    """A self-signed root that issues leaf certificates."""

    name: str
    directory: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path, name: str = "shardkv test CA") -> CA:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _validity(
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
        )
        cert = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        ca = cls(name, directory, key, cert.sign(key, hashes.SHA256()))
        ca.pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        return ca

    @property
    def pem(self) -> Path:
        """The CA certificate, for ``--ca-file``."""
        return self.directory / "ca.pem"

    def issue(self, stem: str, names: tuple[str, ...] = LOOPBACK_NAMES) -> Leaf:
        """A server certificate for ``names`` (IP addresses become IP SANs, the rest DNS)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            _validity(
                x509.CertificateBuilder()
                .subject_name(_name(names[0]))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        leaf = Leaf(self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        leaf.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        leaf.key.write_bytes(_pem_key(key))
        leaf.key.chmod(0o600)
        return leaf
