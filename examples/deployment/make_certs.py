"""Create the keys a fedtune deployment needs, with the `cryptography` package (no openssl binary needed).

Two jobs, run by different people:

* The SuperLink operator creates a certificate authority and the SuperLink's TLS certificate::

      python examples/deployment/make_certs.py tls --out certs --san superlink.example.org --san 127.0.0.1

  -> ``certs/ca.crt`` (give it to every node and every `flwr` user), ``certs/ca.key`` (keep it offline),
  ``certs/server.pem`` + ``certs/server.key`` (for ``flower-superlink``). Always keep ``127.0.0.1`` among the
  SANs: the SuperLink's own SuperExec connects to it on that address.

* Each data holder creates its SuperNode's authentication key and sends only the ``.pub`` file to the operator,
  who registers it with ``flwr supernode register keys/hospital-a.pub <connection>``::

      python examples/deployment/make_certs.py node-key --out keys --name hospital-a

  -> ``keys/hospital-a`` (OpenSSH EC P-384 private key, for ``flower-supernode --auth-supernode-private-key``)
  and ``keys/hospital-a.pub`` (OpenSSH public key).

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; delete it first or choose another --out directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    print(f"wrote {path}")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_tls(out: Path, sans: list[str], days: int) -> None:
    """A self-signed CA and a server certificate for ``sans`` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=10 * days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / "server.key", _pem_key(server_key), private=True)
    _write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_key(out: Path, name: str) -> None:
    """An OpenSSH-format EC (NIST P-384) key pair for SuperNode authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode(), private=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="CA + SuperLink server certificate")
    tls.add_argument("--out", type=Path, default=Path("certs"))
    tls.add_argument(
        "--san", action="append", help="DNS name or IP of the SuperLink (repeat; default: localhost, 127.0.0.1)"
    )
    tls.add_argument("--days", type=int, default=365, help="server certificate validity (the CA gets ten times this)")
    node = commands.add_parser("node-key", help="SuperNode authentication key pair (OpenSSH EC P-384)")
    node.add_argument("--out", type=Path, default=Path("keys"))
    node.add_argument("--name", required=True, help="file name, e.g. hospital-a")
    args = parser.parse_args()
    if args.command == "tls":
        make_tls(args.out, args.san or ["localhost", "127.0.0.1"], args.days)
    else:
        make_node_key(args.out, args.name)


if __name__ == "__main__":
    main()
