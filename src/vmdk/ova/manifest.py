"""The manifest (``NAME.mf``) and its signature (``NAME.cert``).

VMware's importers take exactly ``ALG(name)= hexdigest``, one space after
the ``=``, ALG one of SHA1, SHA256 and SHA512.  Look-alikes that other tools
write are recognised, so that ``verify`` can name them and ``fix`` rewrite
them: ``sha256sum --tag`` (``SHA256 (name) = hex``), OpenSSL 3
(``SHA2-256(name)= hex``), and the plain ``hex  name`` of ``sha256sum``.

The certificate file holds ``ALG(NAME.mf)= hexsignature`` over the manifest's
bytes, then the signer's certificate in PEM (ovftool's layout).  Signing and
checking need the ``cryptography`` package (``pip install vmdk[ova]``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VmdkError

if TYPE_CHECKING:
    import hashlib

#: The algorithms importers accept, in VMware's spelling, with their digest length.
ALGORITHMS = {"SHA1": 40, "SHA256": 64, "SHA512": 128}
DEFAULT_ALGORITHM = "SHA256"
#: Spellings of the same algorithms that other tools write (all refused by VMware).
_ALIASES = {"SHA-1": "SHA1", "SHA-256": "SHA256", "SHA-512": "SHA512", "SHA2-256": "SHA256",
            "SHA2-512": "SHA512"}
#: The most a manifest or certificate file may hold (a line per member: kilobytes).
MAX_SIZE = 1 << 20

_ACCEPTED = re.compile(r"(?P<alg>[A-Z0-9]+)\((?P<name>[^\n]*)\)= (?P<digest>[0-9a-fA-F]+)")
_LOOSE = re.compile(r"(?P<alg>[A-Za-z0-9-]+) ?\((?P<name>[^\n]*)\) ?= ?(?P<digest>[0-9a-fA-F]+)")
_PLAIN = re.compile(r"(?P<digest>[0-9a-fA-F]{40,128}) [ *](?P<name>.+)")


@dataclass(frozen=True)
class Entry:
    """One manifest line: what it says, and what is wrong with how it says it."""

    line: int
    name: str
    algorithm: str | None  # canonical (SHA256), or None when unknown
    digest: str
    problem: str | None = None  # why importers refuse the line, None when they take it


def _canonical(algorithm: str) -> str | None:
    upper = algorithm.upper()
    return upper if upper in ALGORITHMS else _ALIASES.get(upper)


def parse(text: str) -> tuple[list[Entry], list[tuple[int, str]]]:
    """The manifest's entries, and the lines (number, text) that are none."""
    entries: list[Entry] = []
    junk: list[tuple[int, str]] = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        entry = _entry(number, line)
        if entry is None:
            junk.append((number, line))
        else:
            entries.append(entry if not raw.endswith("\r") or entry.problem else _with_problem(
                entry, "it ends in CR LF"))
    return entries, junk


def _with_problem(entry: Entry, problem: str) -> Entry:
    return Entry(entry.line, entry.name, entry.algorithm, entry.digest, problem)


def _entry(number: int, line: str) -> Entry | None:
    if m := _ACCEPTED.fullmatch(line):
        algorithm = _canonical(m["alg"])
        entry = Entry(number, m["name"], algorithm, m["digest"].lower())
        if algorithm is None:
            return entry  # well formed, of an algorithm no importer takes: the caller says so
        if m["alg"] != algorithm:
            return _with_problem(entry, f"{m['alg']} is OpenSSL 3's spelling, importers take "
                                        f"{algorithm}")
        return _check_length(entry)
    if m := _LOOSE.fullmatch(line):
        algorithm = _canonical(m["alg"])
        entry = Entry(number, m["name"], algorithm, m["digest"].lower(),
                      "not ALG(name)= digest: spaces around the name or the '=' (as "
                      "'sha256sum --tag' writes)")
        return entry
    if m := _PLAIN.fullmatch(line):
        algorithm = next((a for a, n in ALGORITHMS.items() if n == len(m["digest"])), None)
        return Entry(number, m["name"], algorithm, m["digest"].lower(),
                     "'digest  name' as sha256sum writes it, not ALG(name)= digest")
    return None


def _check_length(entry: Entry) -> Entry:
    assert entry.algorithm is not None
    if len(entry.digest) != ALGORITHMS[entry.algorithm]:
        return _with_problem(entry, f"a {entry.algorithm} digest has "
                                    f"{ALGORITHMS[entry.algorithm]} hex digits, not "
                                    f"{len(entry.digest)}")
    return entry


def format_line(algorithm: str, name: str, digest: str) -> str:
    """One manifest line as importers take it."""
    return f"{algorithm}({name})= {digest}\n"


def format_manifest(algorithm: str, digests: Iterable[tuple[str, str]]) -> bytes:
    return "".join(format_line(algorithm, name, d) for name, d in digests).encode()


def hasher(algorithm: str) -> hashlib._Hash:
    """A fresh hash object of a canonical algorithm name."""
    import hashlib  # OpenSSL is slow to load and only packages need it

    return hashlib.new(algorithm.lower())


def check_algorithm(name: str) -> str:
    """The canonical spelling of a manifest algorithm given by a user (sha256, SHA-256)."""
    canonical = _canonical(name)
    if canonical is None:
        raise VmdkError(f"unknown manifest algorithm {name!r}: use sha1, sha256 or sha512")
    return canonical


# ------------------------------------------------------------------------- certificates


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise VmdkError("signatures need the 'cryptography' package: pip install "
                        "'vmdk[ova]'") from None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    return x509, hashes, serialization, ec, padding, rsa


_CERT_LINE = re.compile(r"(?P<alg>[A-Za-z0-9-]+)\((?P<name>[^\n]*)\)= ?(?P<sig>[0-9a-fA-F]+)")


@dataclass(frozen=True)
class Signature:
    algorithm: str
    manifest_name: str
    signature: bytes
    certificate_pem: bytes


def parse_cert_file(data: bytes) -> Signature:
    """The signature line and the certificate of a ``.cert`` member."""
    text = data.decode("ascii", "replace")
    first = text.partition("\n")[0]
    m = _CERT_LINE.fullmatch(first.strip())
    if not m or not _canonical(m["alg"]):
        raise ValueError("its first line is not ALG(NAME.mf)= hexsignature")
    start = text.find("-----BEGIN CERTIFICATE-----")
    if start < 0:
        raise ValueError("it holds no PEM certificate")
    return Signature(_canonical(m["alg"]) or "", m["name"], bytes.fromhex(m["sig"]),
                     text[start:].encode())


def check_signature(signature: Signature, manifest: bytes) -> list[str]:
    """What is wrong with a signature of ``manifest`` (empty when it holds)."""
    x509, hashes, _serialization, ec, padding, rsa = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(signature.certificate_pem)
    except ValueError as exc:
        return [f"its certificate cannot be read ({exc})"]
    digest = getattr(hashes, signature.algorithm)()
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature.signature, manifest, padding.PKCS1v15(), digest)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature.signature, manifest, ec.ECDSA(digest))
        else:
            return [f"its certificate's {type(key).__name__} key is neither RSA nor EC"]
    except InvalidSignature:
        return ["the signature does not match the manifest and certificate"]
    return []


def certificate_dates(signature: Signature) -> tuple[Any, Any]:
    """(not before, not after) of the signing certificate, as aware datetimes."""
    x509 = _crypto()[0]
    cert = x509.load_pem_x509_certificate(signature.certificate_pem)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def sign(manifest: bytes, manifest_name: str, key_pem: bytes, cert_pem: bytes,
         algorithm: str = DEFAULT_ALGORITHM) -> bytes:
    """A ``.cert`` member: the signature of ``manifest``, then the certificate."""
    x509, hashes, serialization, ec, padding, rsa = _crypto()
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise VmdkError(f"the signing key cannot be read (an unencrypted PEM private key "
                        f"is needed): {exc}") from exc
    start = cert_pem.find(b"-----BEGIN CERTIFICATE-----")
    end = cert_pem.find(b"-----END CERTIFICATE-----")
    if start < 0 or end < 0:
        raise VmdkError("the certificate file holds no PEM certificate")
    pem = cert_pem[start:end + len(b"-----END CERTIFICATE-----")] + b"\n"
    cert = x509.load_pem_x509_certificate(pem)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise VmdkError("the signing key does not belong to the certificate")
    digest = getattr(hashes, algorithm)()
    if isinstance(key, rsa.RSAPrivateKey):
        raw = key.sign(manifest, padding.PKCS1v15(), digest)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.sign(manifest, ec.ECDSA(digest))
    else:
        raise VmdkError(f"a {type(key).__name__} key cannot sign a manifest: use RSA or EC")
    return f"{algorithm}({manifest_name})= {raw.hex()}\n".encode() + pem


__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "Entry", "Signature", "check_algorithm",
           "check_signature", "format_line", "format_manifest", "hasher", "parse",
           "parse_cert_file", "sign"]
