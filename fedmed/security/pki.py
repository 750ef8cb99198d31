"""The consortium's PKI: a CA, the coordinator's TLS certificate, and each site's node key.

Layout of a PKI directory (``fedmed pki init`` makes it; private keys are 0600):

    ca.crt  ca.key                      consortium CA (ECDSA P-384); ca.key never leaves here
    coordinator.crt  coordinator.key    the SuperLink's TLS certificate (DNS/IP SANs)
    sites/<name>/node.key  node.pub     a site's node-authentication key pair (ECDSA P-384,
                                        OpenSSH format: what Flower's SuperNode auth takes)
    sites/<name>/ca.crt                 copy of the CA certificate the site verifies TLS with
    registered/<name>.pub               sites the coordinator admits (registered at start-up)
    operators/<name>/operator.crt .key  an operator's client certificate (OU=fedmed-operators):
                                        the only credential the coordinator's gate accepts for
                                        its Control API (submit, list, log, stop, register)

A hospital may instead make its key pair itself and hand over only node.pub
(``fedmed coordinator register NAME node.pub``): the private key then never leaves the site.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.config import check_site_name
from fedmed.errors import ConfigError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
COORDINATOR_CERT = "coordinator.crt"
COORDINATOR_KEY = "coordinator.key"
OPERATOR_CERT = "operator.crt"
OPERATOR_KEY = "operator.key"
OPERATOR_OU = "fedmed-operators"  # what the gate (fedmed.runtime.gate) requires
# The SuperLink listens on 127.0.0.1 behind the gate; the gate (which checks a DNS name: nginx
# does not match IP SANs) and the coordinator's executor dial it: every coordinator certificate
# names both.
LOOPBACK = ("localhost", "127.0.0.1")


def _write_private(path: Path, data: bytes) -> None:
    """Create a private key file readable by its owner only; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init_ca(pki_dir: Path, name: str = "fedmed consortium CA", days: int = 3650) -> Path:
    """Make the consortium CA; refuses to replace an existing one (sites already trust it)."""
    pki_dir = Path(pki_dir)
    if (pki_dir / CA_CERT).exists() or (pki_dir / CA_KEY).exists():
        raise ConfigError(
            f"a CA already exists in {pki_dir}; keep using it, or choose another --dir"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    _write_private(pki_dir / CA_KEY, _pem_key(key))
    _write_public(pki_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return pki_dir / CA_CERT


def load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    pki_dir = Path(pki_dir)
    try:
        cert = x509.load_pem_x509_certificate((pki_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((pki_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            f"no CA in {pki_dir}; create one with: fedmed pki init --dir {pki_dir}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"the CA files in {pki_dir} are unreadable ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{pki_dir / CA_KEY} is not an EC key made by fedmed pki init")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_coordinator(pki_dir: Path, hosts: list[str], days: int = 825) -> Path:
    """The SuperLink's TLS certificate, valid for every name/IP the sites will dial."""
    if not hosts:
        raise ConfigError("give at least one --host the sites use to reach the coordinator")
    hosts = [*hosts, *(h for h in LOOPBACK if h not in hosts)]
    pki_dir = Path(pki_dir)
    ca_cert, ca_key = load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    # Re-issuing (a new host name) replaces the pair; the CA, which sites trust, stays.
    for stale in (COORDINATOR_KEY, COORDINATOR_CERT):
        (pki_dir / stale).unlink(missing_ok=True)
    _write_private(pki_dir / COORDINATOR_KEY, _pem_key(key))
    _write_public(pki_dir / COORDINATOR_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return pki_dir / COORDINATOR_CERT


def issue_operator(pki_dir: Path, name: str, days: int = 365) -> Path:
    """An operator's client certificate: who may submit, list, read and stop runs, and register
    or unregister sites, through the coordinator's gate. Returns the operator's folder."""
    check_site_name(name)  # the same plain-name rule: it becomes a folder name
    pki_dir = Path(pki_dir)
    ca_cert, ca_key = load_ca(pki_dir)
    folder = pki_dir / "operators" / name
    if (folder / OPERATOR_KEY).exists():
        raise ConfigError(f"operator '{name}' already has a certificate in {folder}")
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_OU),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(folder / OPERATOR_KEY, _pem_key(key))
    _write_public(folder / OPERATOR_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _write_public(folder / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    return folder


def make_node_key(key_path: Path) -> Path:
    """A node-authentication key pair in OpenSSH format (key_path and key_path.pub sibling)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(key_path, private)
    pub = key_path.with_name("node.pub")
    _write_public(pub, public + b"\n")
    return pub


def read_node_public_key(path: Path) -> bytes:
    """An OpenSSH ECDSA public key, checked before it is handed to the SuperLink."""
    try:
        data = Path(path).read_bytes().strip()
        key = serialization.load_ssh_public_key(data)
    except FileNotFoundError:
        raise ConfigError(f"public key {path} not found") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path} is not an OpenSSH public key; use the node.pub made by "
            "`fedmed pki issue-site` (or `ssh-keygen -t ecdsa -b 384`)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path} is not an ECDSA key; Flower's node auth takes ECDSA keys")
    return data


def issue_site(pki_dir: Path, name: str) -> Path:
    """A site's bundle (node key pair + CA certificate) and its registration at the coordinator.

    Returns the bundle directory, which is what the hospital receives.
    """
    check_site_name(name)
    pki_dir = Path(pki_dir)
    ca_cert, _ = load_ca(pki_dir)
    bundle = pki_dir / "sites" / name
    if (bundle / "node.key").exists():
        raise ConfigError(
            f"site '{name}' already has a key in {bundle}; revoke it with "
            f"`fedmed coordinator unregister {name}` before issuing a new one"
        )
    pub = make_node_key(bundle / "node.key")
    _write_public(bundle / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    register_site(pki_dir, name, pub)
    return bundle


def register_site(pki_dir: Path, name: str, public_key: Path) -> Path:
    """Admit a site: its public key joins the coordinator's registry (read at start-up)."""
    check_site_name(name)
    data = read_node_public_key(public_key)
    target = Path(pki_dir) / "registered" / f"{name}.pub"
    _write_public(target, data + b"\n")
    return target


def registered_sites(pki_dir: Path) -> dict[str, Path]:
    folder = Path(pki_dir) / "registered"
    return {p.stem: p for p in sorted(folder.glob("*.pub"))} if folder.is_dir() else {}
