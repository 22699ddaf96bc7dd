"""``mpc-rec certs``: a pilot CA and one key and certificate per party, for tests and trials.

A real pilot would have each organisation generate its own key and have the CA sign a
request, so that no private key ever leaves its owner; this command makes everything in
one place, which suits a trial run by one team and the tests. Keys are written 0600.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpc_rec.errors import ConfigError
from mpc_rec.files import write_text_atomic

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    staged = path.with_name(f".{path.name}.tmp")
    staged.unlink(missing_ok=True)
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    os.replace(staged, path)


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, ca: bool, days: int) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def make_pilot_certificates(out: Path, parties: list[str], *, ca_name: str = "mpc-rec pilot CA",
                            days: int = 365) -> dict[str, Path]:
    """Write ca.pem (+ ca.key) and <party>.pem / <party>.key into out; returns the paths."""
    if not parties:
        raise ConfigError("--parties: name at least one party")
    for name in parties:
        if not _NAME.match(name):
            raise ConfigError(f"--parties: '{name}' is not a valid party name (lower-case letters, digits, "
                              "'-'; it becomes the certificate's DNS name)")
    if len(set(parties)) != len(parties):
        raise ConfigError("--parties: names must be distinct")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_subject, ca_key, ca=True, days=days)
    _write_key(out / "ca.key", ca_key)
    write_text_atomic(out / "ca.pem", _pem(ca_cert))
    written = {"ca": out / "ca.pem"}
    for name in parties:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_key(out / f"{name}.key", key)
        write_text_atomic(out / f"{name}.pem", _pem(_certificate(name, key.public_key(), ca_subject, ca_key,
                                                                 ca=False, days=days)))
        written[name] = out / f"{name}.pem"
    return written


def certificate_fingerprint(path: Path) -> str:
    """The pin to put in a [[peer]] entry's ``fingerprint``."""
    from mpc_rec.transport.settings import fingerprint

    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return fingerprint(certificate.public_bytes(serialization.Encoding.DER))


def loopback_tls(folder: Path, names: list[str], ports: list[int]) -> tuple[list[dict], dict[str, dict]]:
    """Certificates and settings for a TLS run on this machine (``mpc-rec run --transport tls``).

    Returns the [[peer]] entries (rank order) and each name's [tls] section.
    """
    make_pilot_certificates(folder, names)
    peers = [{"rank": rank, "name": name, "address": "127.0.0.1", "port": port}
             for rank, (name, port) in enumerate(zip(names, ports))]
    sections = {name: {"ca": str(folder / "ca.pem"), "cert": str(folder / f"{name}.pem"),
                       "key": str(folder / f"{name}.key")} for name in names}
    return peers, sections
