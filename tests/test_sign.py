"""pvpatch.elf.sign against independent tools: `openssl cms -verify` and the kernel's own sign-file.

sign-file comes from Debian's linux-kbuild-6.1 (installed when missing); with an RSA key
PKCS#1 v1.5 signatures are deterministic, so its output and ours must be the same bytes.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import struct
import subprocess
from pathlib import Path

import corpus
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

import pvpatch
from pvpatch.elf.reader import MODULE_SIG_MAGIC
from pvpatch.elf.sign import HASHES, read_trailer, sign_module, signature_blob, strip_signature
from pvpatch.errors import InputError, UsageError

FIXTURE = corpus.REPO / "fixtures" / "x86_64" / "kernel61.o"
KBUILD_PACKAGE = "linux-kbuild-6.1"


def _keypair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
             cn: str = "pvpatch test key") -> tuple[bytes, bytes]:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, algorithm)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[bytes, bytes]:
    return _keypair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pair() -> tuple[bytes, bytes]:
    return _keypair(ec.generate_private_key(ec.SECP256R1()), "pvpatch ec key")


@pytest.fixture(scope="module")
def sign_file() -> str:
    """The kernel's scripts/sign-file (Debian linux-kbuild-6.1), installed when missing."""
    found = sorted(glob.glob("/usr/lib/linux-kbuild-*/scripts/sign-file"))
    if not found:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", KBUILD_PACKAGE]
        subprocess.run([*sudo, *install], env=env, check=True, stdout=subprocess.DEVNULL)
        found = sorted(glob.glob("/usr/lib/linux-kbuild-*/scripts/sign-file"))
    assert found, f"{KBUILD_PACKAGE} installed but has no scripts/sign-file"
    return found[-1]


def _openssl_verify(tmp: Path, signed: bytes, cert_pem: bytes) -> subprocess.CompletedProcess[str]:
    blob = signature_blob(signed)
    assert blob is not None
    (tmp / "sig.der").write_bytes(blob)
    (tmp / "content").write_bytes(strip_signature(signed))
    (tmp / "cert.pem").write_bytes(cert_pem)
    return subprocess.run(
        ["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp / "sig.der"),
         "-content", str(tmp / "content"), "-certfile", str(tmp / "cert.pem"), "-noverify",
         "-out", os.devnull],
        capture_output=True, text=True,
    )  # fmt: skip


def test_trailer_layout(rsa_pair: tuple[bytes, bytes]) -> None:
    data = FIXTURE.read_bytes()
    signed = sign_module(data, *rsa_pair)
    assert signed.startswith(data)
    assert signed.endswith(b"~Module signature appended~\n") and signed[-28:] == MODULE_SIG_MAGIC
    info = signed[-28 - 12 : -28]
    algo, hash_, id_type, signer_len, key_id_len = info[:5]
    (sig_len,) = struct.unpack(">I", info[8:])
    assert (algo, hash_, id_type, signer_len, key_id_len, info[5:8]) == (0, 0, 2, 0, 0, bytes(3))
    assert len(signed) == len(data) + sig_len + 12 + 28
    assert signed[len(data)] == 0x30  # the DER SEQUENCE of the ContentInfo
    trailer = read_trailer(signed)
    assert trailer is not None and (trailer.offset, trailer.sig_len) == (len(data), sig_len)
    # pvpatch's own ELF model agrees on where the content ends.
    assert pvpatch.elf.reader.ElfFile(signed).content_end == len(data)


@pytest.mark.parametrize("hash_name", HASHES)
def test_openssl_verifies_the_signature(
    tmp_path: Path, rsa_pair: tuple[bytes, bytes], hash_name: str
) -> None:
    signed = sign_module(FIXTURE.read_bytes(), *rsa_pair, hash=hash_name)
    proc = _openssl_verify(tmp_path, signed, rsa_pair[1])
    assert proc.returncode == 0, proc.stderr
    assert "Verification successful" in proc.stderr
    # One changed byte of content and the same blob no longer verifies.
    content = bytearray(strip_signature(signed))
    content[100] ^= 1
    tampered = bytes(content) + signed[len(content) :]
    assert _openssl_verify(tmp_path, tampered, rsa_pair[1]).returncode != 0


def test_openssl_verifies_an_ec_signature(tmp_path: Path, ec_pair: tuple[bytes, bytes]) -> None:
    signed = sign_module(FIXTURE.read_bytes(), *ec_pair)
    proc = _openssl_verify(tmp_path, signed, ec_pair[1])
    assert proc.returncode == 0, proc.stderr


def test_structure_is_what_sign_file_writes(tmp_path: Path, rsa_pair: tuple[bytes, bytes]) -> None:
    """Detached, no certificates, no signed attributes, signer by issuer and serial."""
    blob = signature_blob(sign_module(FIXTURE.read_bytes(), *rsa_pair))
    assert blob is not None
    (tmp_path / "sig.der").write_bytes(blob)
    text = subprocess.run(
        ["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(tmp_path / "sig.der")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "contentType: pkcs7-signedData" in text
    assert "eContent: <ABSENT>" in text
    assert "certificates:\n      <ABSENT>" in text
    assert "signedAttrs:\n          <ABSENT>" in text
    assert "d.issuerAndSerialNumber" in text and "CN=pvpatch test key" in text
    assert "algorithm: rsaEncryption" in text


@pytest.mark.parametrize("hash_name", HASHES)
def test_byte_identical_to_sign_file(
    tmp_path: Path, sign_file: str, rsa_pair: tuple[bytes, bytes], hash_name: str
) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_bytes(rsa_pair[0])
    cert.write_bytes(rsa_pair[1])
    module = tmp_path / "m.ko"
    module.write_bytes(FIXTURE.read_bytes())
    subprocess.run([sign_file, hash_name, str(key), str(cert), str(module)], check=True)
    assert sign_module(FIXTURE.read_bytes(), *rsa_pair, hash=hash_name) == module.read_bytes()


def test_ec_structure_matches_sign_file(
    tmp_path: Path, sign_file: str, ec_pair: tuple[bytes, bytes]
) -> None:
    """ECDSA signatures are randomised: compare everything but the signature value."""
    key, cert, module = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "m.ko"
    key.write_bytes(ec_pair[0])
    cert.write_bytes(ec_pair[1])
    module.write_bytes(FIXTURE.read_bytes())
    subprocess.run([sign_file, "sha256", str(key), str(cert), str(module)], check=True)

    def shape(blob: bytes) -> list[str]:
        (tmp_path / "b.der").write_bytes(blob)
        out = subprocess.run(
            ["openssl", "asn1parse", "-inform", "DER", "-in", str(tmp_path / "b.der")],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        # Drop offsets and lengths (the DER ECDSA value varies by a byte or two).
        return [line.split(":", 3)[-1].strip() for line in out.splitlines()
                if "OCTET STRING" not in line]  # fmt: skip

    theirs = signature_blob(module.read_bytes())
    ours = signature_blob(sign_module(FIXTURE.read_bytes(), *ec_pair))
    assert theirs is not None and ours is not None
    assert shape(ours) == shape(theirs)
    assert "ecdsa-with-SHA256" in " ".join(shape(ours))


def test_strip_and_resign(rsa_pair: tuple[bytes, bytes]) -> None:
    data = FIXTURE.read_bytes()
    assert strip_signature(data) == data
    signed = sign_module(data, *rsa_pair)
    assert strip_signature(signed) == data
    assert sign_module(signed, *rsa_pair) == signed  # an old signature is replaced, not stacked


@pytest.mark.corpus
def test_debian_module_signature_is_read_stripped_and_replaced(
    tmp_path: Path, rsa_pair: tuple[bytes, bytes]
) -> None:
    path = next(p for p in corpus.x86_64_pv_modules() if p.name == "aes_ti.ko")
    data = path.read_bytes()
    trailer = read_trailer(data)
    elf_sig = pvpatch.open_elf(path).module_signature
    assert trailer is not None and elf_sig is not None
    assert (trailer.offset, trailer.sig_len) == (elf_sig.offset, elf_sig.sig_len)
    content = strip_signature(data)
    assert len(content) == trailer.offset
    # Patch it, then re-sign pvpatch's output: openssl verifies it over the patched bytes.
    rw = pvpatch.apply_plan(pvpatch.make_plan(pvpatch.load(path, ops="catalog:linux-6.1-x86_64")))
    assert rw.changed and rw.signature_removed
    signed = sign_module(rw.data, *rsa_pair)
    assert strip_signature(signed) == rw.data
    assert _openssl_verify(tmp_path, signed, rsa_pair[1]).returncode == 0


def test_combined_pem_and_der_inputs(rsa_pair: tuple[bytes, bytes]) -> None:
    """The kernel's signing_key.pem holds key and certificate; DER works too."""
    key_pem, cert_pem = rsa_pair
    data = FIXTURE.read_bytes()
    expected = sign_module(data, key_pem, cert_pem)
    both = key_pem + cert_pem
    assert sign_module(data, both, both) == expected
    key = serialization.load_pem_private_key(key_pem, None)
    key_der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert sign_module(data, key_der, cert_der) == expected


def test_encrypted_key(rsa_pair: tuple[bytes, bytes]) -> None:
    key = serialization.load_pem_private_key(rsa_pair[0], None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )  # fmt: skip
    data = FIXTURE.read_bytes()
    with pytest.raises(InputError, match="signing key"):
        sign_module(data, encrypted, rsa_pair[1])
    assert sign_module(data, encrypted, rsa_pair[1], password=b"secret") == sign_module(
        data, *rsa_pair
    )


def test_refusals(rsa_pair: tuple[bytes, bytes], ec_pair: tuple[bytes, bytes]) -> None:
    data = FIXTURE.read_bytes()
    with pytest.raises(InputError, match="does not match the certificate"):
        sign_module(data, rsa_pair[0], ec_pair[1])
    with pytest.raises(InputError, match="signing key"):
        sign_module(data, b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                    rsa_pair[1])  # fmt: skip
    with pytest.raises(InputError, match="no PEM CERTIFICATE"):
        sign_module(data, rsa_pair[0], rsa_pair[0])
    with pytest.raises(InputError, match="signing certificate"):
        sign_module(data, rsa_pair[0], b"not a certificate")
    with pytest.raises(UsageError, match="unsupported signature hash"):
        sign_module(data, *rsa_pair, hash="md5")
    with pytest.raises(InputError, match="not an ELF file"):
        sign_module(b"hello", *rsa_pair)
    ed = _keypair(ed25519.Ed25519PrivateKey.generate(), "ed")
    with pytest.raises(InputError, match="not supported"):
        sign_module(data, *ed)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda info: info[:2] + b"\x01" + info[3:], "not PKCS#7"),
        (lambda info: b"\x01" + info[1:], "legacy fields"),
        (lambda info: info[:8] + struct.pack(">I", 1 << 30), "runs before the ELF content"),
    ],
)
def test_malformed_trailers_are_refused(
    rsa_pair: tuple[bytes, bytes], mutate: object, message: str
) -> None:
    signed = sign_module(FIXTURE.read_bytes(), *rsa_pair)
    info_at = len(signed) - 28 - 12
    assert callable(mutate)
    bad = signed[:info_at] + mutate(signed[info_at : info_at + 12]) + signed[-28:]
    with pytest.raises(InputError, match=message):
        strip_signature(bad)
    with pytest.raises(InputError, match="truncated"):
        strip_signature(MODULE_SIG_MAGIC)


def test_openssl_is_installed() -> None:
    assert shutil.which("openssl"), "the openssl CLI (Debian package openssl) is needed"


@pytest.mark.corpus
def test_patch_cli_signs_the_output(tmp_path: Path, rsa_pair: tuple[bytes, bytes]) -> None:
    """`patch --sign-key/--sign-cert` on a signed Debian module: a new, valid signature."""
    import json
    import sys

    import corpus

    ko = next(m for m in corpus.x86_64_pv_modules() if m.name == "macvlan.ko")
    vmlinux = corpus.x86_64_vmlinux()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_bytes(rsa_pair[0])
    cert.write_bytes(rsa_pair[1])
    out = tmp_path / "macvlan.ko"
    proc = subprocess.run(
        [sys.executable, "-m", "pvpatch", "patch", str(ko), "-o", str(out), "--ops",
         f"btf:{vmlinux}", "--sign-key", str(key), "--sign-cert", str(cert), "--json"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["signature"] == "signed"
    signed = out.read_bytes()
    assert signed.endswith(b"~Module signature appended~\n")
    assert _openssl_verify(tmp_path, signed, rsa_pair[1]).returncode == 0
    # one of the pair alone is a usage error
    proc = subprocess.run(
        [sys.executable, "-m", "pvpatch", "patch", str(ko), "-o", str(tmp_path / "x.ko"),
         "--sign-key", str(key)], capture_output=True, text=True)
    assert proc.returncode == 2 and "go together" in proc.stderr
