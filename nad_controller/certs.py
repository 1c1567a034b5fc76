"""The webhook's TLS: serving certificates from files (a mounted Secret; cert-manager writes
`tls.crt`/`tls.key` and rotates them in place) reloaded when they change, or a self-generated CA
and serving certificate for the webhook's Service when no files are given.

The API server verifies the webhook against the ValidatingWebhookConfiguration's `caBundle`:
with self-generated certificates the caller patches the CA in (`k8s_lookups.patch_ca_bundle`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = structlog.get_logger(__name__)

# How often a connection may trigger a look at the files' mtimes (a stat each, no more).
RECHECK_SECONDS: Final = 1.0
VALIDITY: Final = datetime.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class Generated:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def service_names(service: str, namespace: str) -> list[str]:
    """Every name the API server may use for the Service (it dials `svc.ns.svc`)."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def generate(dns_names: list[str], *, ips: tuple[str, ...] = ()) -> Generated:
    """A fresh CA and a serving certificate it signed for `dns_names` (and `ips`). ECDSA P-256:
    small, fast, and accepted by every API server release in support."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plexus-webhook-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Generated(
        ca_pem=ca.public_bytes(pem),
        cert_pem=cert.public_bytes(pem),
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def write_pair(directory: Path, generated: Generated) -> tuple[Path, Path]:
    """tls.crt / tls.key (the key readable by its owner only), as a Secret mount names them."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "tls.crt", directory / "tls.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(generated.key_pem)
    cert.write_bytes(generated.cert_pem)
    (directory / "ca.crt").write_bytes(generated.ca_pem)
    return cert, key


class CertSource:
    """The current server SSLContext for a certificate/key file pair. A new connection takes
    `context()`; when either file changed (cert-manager rotated the Secret, the kubelet swapped
    the mount's symlink) a new context is built. A pair that does not load (the two files
    caught mid-rotation) keeps the previous context, and is retried on the next change."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self._files = (cert_file, key_file)
        self._lock = threading.Lock()
        self._stamp = self._read_stamp()
        self._context = self._load()  # the first load must work: no serving without a cert
        self._checked = time.monotonic()
        self.reloads = 0

    def context(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < RECHECK_SECONDS:
            return self._context
        with self._lock:
            self._checked = now
            stamp = self._read_stamp()
            if stamp != self._stamp:
                try:
                    self._context = self._load()
                    self._stamp = stamp
                    self.reloads += 1
                    log.info("webhook certificate reloaded", cert=self._files[0])
                except (OSError, ssl.SSLError) as exc:
                    log.warning("webhook certificate not reloaded", error=str(exc))
            return self._context

    def _read_stamp(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self._files:
            try:
                st = os.stat(path)  # follows the Secret mount's ..data symlink
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(*self._files)
        return context
