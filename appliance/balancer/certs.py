"""TLS for the balancer: the server context (stdlib ssl), its reload, and `init --tls self-signed`.

The context allows TLS 1.2 and newer with forward-secret AEAD ciphers only and
offers ALPN http/1.1. On SIGHUP the server calls `reload()`: the new files are
first loaded into a scratch context (so a broken or mismatched pair is reported
and the old certificate stays), then into the live context, which OpenSSL uses
for every handshake after that; open connections are not touched.

`init_self_signed(data_dir)` writes tls/cert.pem and tls/key.pem (0600) for this
host name, localhost and the loopback addresses, and points [balancer] tls_cert
and tls_key of the data dir's appliance.toml at them.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
import socket
import ssl
from pathlib import Path

from appliance import secretfile

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"
CERT_FILE = "tls/cert.pem"
KEY_FILE = "tls/key.pem"


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server context for `cert`/`key`; raises ssl.SSLError or OSError naming the problem."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def reload(ctx: ssl.SSLContext, cert: str | Path, key: str | Path) -> None:
    """Serve the certificate now in `cert`/`key` on new handshakes; raises (keeping the old one) when they are bad."""
    server_context(cert, key)  # validate the pair before touching the live context
    ctx.load_cert_chain(str(cert), str(key))


def make_self_signed(hostname: str, days: int = 825) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `hostname`, localhost, 127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Appliance")])
    alt: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        alt.append(x509.DNSName("localhost"))
    alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def set_config_keys(config_path: Path, values: dict[str, str]) -> None:
    """Set keys of [balancer] in appliance.toml in place, keeping every comment and other line."""
    text = config_path.read_text("utf-8") if config_path.exists() else ""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "[balancer]"), None)
    if start is None:
        lines += ["", "[balancer]"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    for key, value in values.items():
        entry = f'{key} = "{value}"'
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
        for i in range(start + 1, end):
            if pattern.match(lines[i]):
                lines[i] = entry
                break
        else:
            lines.insert(start + 1, entry)
            end += 1
    secretfile.write_private(config_path, ("\n".join(lines) + "\n").encode("utf-8"))


def init_self_signed(data_dir: str | Path, hostname: str | None = None) -> tuple[Path, Path]:
    """Write a self-signed certificate and key (0600) into data_dir/tls and point the config at them."""
    data_dir = Path(data_dir)
    host = hostname or socket.getfqdn() or "localhost"
    cert_pem, key_pem = make_self_signed(host)
    cert_path, key_path = data_dir / CERT_FILE, data_dir / KEY_FILE
    secretfile.write_private(key_path, key_pem)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert_pem)
    set_config_keys(data_dir / "appliance.toml", {"tls_cert": CERT_FILE, "tls_key": KEY_FILE})
    print(f"wrote a self-signed certificate for {host!r}: {cert_path} (key {key_path}, mode 0600)")
    print(f"[balancer] tls_cert = {CERT_FILE!r} and tls_key = {KEY_FILE!r} are set in {data_dir / 'appliance.toml'}")
    return cert_path, key_path
