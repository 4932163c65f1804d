"""Kernel module signatures: strip an appended one, or sign like the kernel's `sign-file`.

A signed module is the ELF content, then a DER PKCS#7/CMS SignedData blob, then
`struct module_signature` (12 bytes) and the magic string:

    struct module_signature {
        u8 algo;        /* 0: in the PKCS#7 message */
        u8 hash;        /* 0: in the PKCS#7 message */
        u8 id_type;     /* 2: PKEY_ID_PKCS7 */
        u8 signer_len;  /* 0 */
        u8 key_id_len;  /* 0 */
        u8 __pad[3];
        __be32 sig_len; /* length of the PKCS#7 blob */
    };

The blob `sign-file` writes (`CMS_NOCERTS | CMS_PARTIAL | CMS_BINARY | CMS_DETACHED |
CMS_STREAM`, the signer added with `CMS_NOSMIMECAP | CMS_NOATTR`) is a detached SignedData
over the module's bytes as they are (binary, no MIME canonicalisation), without
certificates and without signed attributes, its signer named by issuer and serial number.
`sign_module` signs with `cryptography` (RSA PKCS#1 v1.5 or ECDSA over the bytes; without
signed attributes the signature covers the content itself) and writes that DER structure
itself: `cryptography`'s PKCS#7 builder would add explicit NULL digest parameters, which
OpenSSL omits. For an RSA key the result is byte-identical to `sign-file`'s.

    >>> from pvpatch.elf.sign import strip_signature
    >>> strip_signature(b"\\x7fELF no signature here")
    b'\\x7fELF no signature here'
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

from ..errors import InputError, UsageError
from ..record import record
from .reader import MODULE_SIG_INFO_SIZE, MODULE_SIG_MAGIC

PKEY_ID_PKCS7: Final = 2
SIG_INFO: Final = struct.Struct(">BBBBB3xI")  # struct module_signature, big-endian sig_len
HASHES: Final = ("sha256", "sha384", "sha512", "sha224")
OID_SIGNED_DATA: Final = "1.2.840.113549.1.7.2"
OID_DATA: Final = "1.2.840.113549.1.7.1"
OID_RSA_ENCRYPTION: Final = "1.2.840.113549.1.1.1"
OID_HASH: Final = {
    "sha224": "2.16.840.1.101.3.4.2.4",
    "sha256": "2.16.840.1.101.3.4.2.1",
    "sha384": "2.16.840.1.101.3.4.2.2",
    "sha512": "2.16.840.1.101.3.4.2.3",
}
OID_ECDSA_WITH: Final = {
    "sha224": "1.2.840.10045.4.3.1",
    "sha256": "1.2.840.10045.4.3.2",
    "sha384": "1.2.840.10045.4.3.3",
    "sha512": "1.2.840.10045.4.3.4",
}

if TYPE_CHECKING:  # cryptography is imported only when signing
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
    from cryptography.x509 import Certificate

assert SIG_INFO.size == MODULE_SIG_INFO_SIZE


@record
class SignatureTrailer:
    """An appended module signature as the kernel's `mod_check_sig()` reads it."""

    offset: int  # where the PKCS#7 blob starts (the end of the ELF content)
    sig_len: int
    algo: int
    hash: int
    id_type: int
    signer_len: int
    key_id_len: int

    @property
    def size(self) -> int:
        """Bytes the signature adds to the module: blob, info and magic."""
        return self.sig_len + MODULE_SIG_INFO_SIZE + len(MODULE_SIG_MAGIC)


def read_trailer(data: bytes, path: str | None = None) -> SignatureTrailer | None:
    """The appended signature of `data`, or None when it ends without the magic.

    A trailer the kernel would refuse (a length running before the ELF header, a type
    other than PKCS#7, non-zero legacy fields) is an InputError.
    """
    if not data.endswith(MODULE_SIG_MAGIC):
        return None
    info_at = len(data) - len(MODULE_SIG_MAGIC) - MODULE_SIG_INFO_SIZE
    if info_at < 0:
        raise InputError("module signature trailer is truncated", path)
    algo, hash_, id_type, signer_len, key_id_len, sig_len = SIG_INFO.unpack_from(data, info_at)
    start = info_at - sig_len
    if start < 0 or not data.startswith(b"\x7fELF") or start < 64:
        raise InputError(
            f"module signature length {sig_len} runs before the ELF content", path
        )
    if id_type != PKEY_ID_PKCS7:
        raise InputError(
            f"module signature type {id_type} is not PKCS#7 ({PKEY_ID_PKCS7})", path
        )
    if algo or hash_ or signer_len or key_id_len or any(data[info_at + 5 : info_at + 8]):
        raise InputError(
            "module signature info has non-zero legacy fields (algo, hash, signer, key id)",
            path,
        )
    return SignatureTrailer(start, sig_len, algo, hash_, id_type, signer_len, key_id_len)


def strip_signature(data: bytes, path: str | None = None) -> bytes:
    """`data` without its appended signature (unchanged when it has none)."""
    trailer = read_trailer(data, path)
    return data if trailer is None else data[: trailer.offset]


def signature_blob(data: bytes, path: str | None = None) -> bytes | None:
    """The DER PKCS#7 blob of an appended signature, or None."""
    trailer = read_trailer(data, path)
    if trailer is None:
        return None
    return data[trailer.offset : trailer.offset + trailer.sig_len]


def append_signature(content: bytes, blob: bytes) -> bytes:
    """`content`, the PKCS#7 `blob`, `struct module_signature` and the magic."""
    if len(blob) >= 1 << 32:
        raise UsageError(f"signature of {len(blob)} bytes does not fit the 32-bit length")
    return content + blob + SIG_INFO.pack(0, 0, PKEY_ID_PKCS7, 0, 0, len(blob)) + MODULE_SIG_MAGIC


def sign_module(
    data: bytes,
    key_pem: bytes,
    cert_pem: bytes,
    hash: str = "sha256",
    *,
    password: bytes | None = None,
    path: str | None = None,
) -> bytes:
    """Sign a module the way `scripts/sign-file` does and return the signed bytes.

    An existing appended signature is removed first, so the new one covers exactly the
    ELF content. `key_pem` and `cert_pem` may be PEM or DER, and may be the same bytes (the
    kernel's `signing_key.pem` holds both); `password` decrypts an encrypted key. The key
    must be RSA or EC and match the certificate's public key. `hash` is one of
    sha256 (the default, Debian's CONFIG_MODULE_SIG_HASH), sha384, sha512, sha224.
    """
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    algorithms: dict[str, hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }
    algorithm = algorithms.get(hash.lower())
    if algorithm is None:
        raise UsageError(f"unsupported signature hash {hash!r} (use one of {', '.join(HASHES)})")
    if not data.startswith(b"\x7fELF"):
        raise InputError("not an ELF file: refusing to sign it as a kernel module", path)
    content = strip_signature(data, path)

    key = _load_key(key_pem, password)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise InputError(
            f"signing key type {type(key).__name__} is not supported for module signatures "
            "(use RSA or EC)"
        )
    cert = _load_cert(cert_pem)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise InputError("the signing key does not match the certificate's public key")

    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(content, padding.PKCS1v15(), algorithm)
        sig_alg = _seq(_oid(OID_RSA_ENCRYPTION), _NULL)
    else:
        signature = key.sign(content, ec.ECDSA(algorithm))
        sig_alg = _seq(_oid(OID_ECDSA_WITH[hash.lower()]))
    blob = _signed_data(cert, OID_HASH[hash.lower()], sig_alg, signature)
    return append_signature(content, blob)


def _signed_data(cert: Certificate, hash_oid: str, sig_alg: bytes, signature: bytes) -> bytes:
    """DER ContentInfo(SignedData) as OpenSSL's CMS writes it for sign-file's flags.

    Version 1, one digest algorithm (parameters absent), detached `data` content, no
    certificates or CRLs, one SignerInfo (version 1, issuerAndSerialNumber) without signed
    or unsigned attributes.
    """
    digest_alg = _seq(_oid(hash_oid))
    issuer_serial = _seq(cert.issuer.public_bytes(), _integer(cert.serial_number))
    signer_info = _seq(_integer(1), issuer_serial, digest_alg, sig_alg, _tlv(0x04, signature))
    signed_data = _seq(
        _integer(1),
        _tlv(0x31, digest_alg),  # SET OF DigestAlgorithmIdentifier
        _seq(_oid(OID_DATA)),  # EncapsulatedContentInfo, content detached
        _tlv(0x31, signer_info),  # SET OF SignerInfo
    )
    return _seq(_oid(OID_SIGNED_DATA), _tlv(0xA0, signed_data))


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + value


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _integer(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    out = bytearray()
    for arc in (first * 40 + second, *rest):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


_NULL = b"\x05\x00"


def _load_key(blob: bytes, password: bytes | None) -> PrivateKeyTypes:
    from cryptography.hazmat.primitives import serialization

    try:
        if b"-----BEGIN" in blob:
            return serialization.load_pem_private_key(_pem_block(blob, "PRIVATE KEY"), password)
        return serialization.load_der_private_key(blob, password)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        raise InputError(f"cannot read the signing key: {exc}") from exc
    except ValueError as exc:
        raise InputError(f"cannot read the signing key: {exc}") from exc


def _load_cert(blob: bytes) -> Certificate:
    from cryptography import x509

    try:
        if b"-----BEGIN" in blob:
            return x509.load_pem_x509_certificate(_pem_block(blob, "CERTIFICATE"))
        return x509.load_der_x509_certificate(blob)
    except ValueError as exc:
        raise InputError(f"cannot read the signing certificate: {exc}") from exc


def _pem_block(blob: bytes, kind: str) -> bytes:
    """The first PEM block whose label ends with `kind` (`PRIVATE KEY` matches RSA/EC/...)."""
    pos = 0
    while True:
        begin = blob.find(b"-----BEGIN ", pos)
        if begin < 0:
            raise InputError(f"no PEM {kind} block found")
        label_end = blob.find(b"-----", begin + 11)
        if label_end < 0:
            raise InputError(f"unterminated PEM header while looking for {kind}")
        label = blob[begin + 11 : label_end]
        end_marker = b"-----END " + label + b"-----"
        end = blob.find(end_marker, label_end)
        if end < 0:
            raise InputError(f"PEM block {label.decode('ascii', 'replace')} has no END line")
        if label.endswith(kind.encode()):
            return blob[begin : end + len(end_marker)] + b"\n"
        pos = end + len(end_marker)


