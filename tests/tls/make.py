#!/usr/bin/env python3
"""Writes the test TLS material (see README.md): a throwaway CA and a localhost server certificate, valid from
2000-01-01 (so a machine with a slow clock accepts them) to 2126. Needs the `cryptography` package."""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

start = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
end = datetime.datetime(2126, 1, 1, tzinfo=datetime.timezone.utc)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


ca_key = ec.generate_private_key(ec.SECP256R1())  # discarded after signing
ca = (
    x509.CertificateBuilder().subject_name(name("loraserve test CA")).issuer_name(name("loraserve test CA"))
    .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
    .not_valid_before(start).not_valid_after(end)
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
    .sign(ca_key, hashes.SHA256())
)
key = ec.generate_private_key(ec.SECP256R1())
server = (
    x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
    .public_key(key.public_key()).serial_number(x509.random_serial_number())
    .not_valid_before(start).not_valid_after(end)
    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    .sign(ca_key, hashes.SHA256())
)
with open("ca.pem", "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
with open("server.pem", "wb") as f:
    f.write(server.public_bytes(serialization.Encoding.PEM))
with open("server.key", "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
