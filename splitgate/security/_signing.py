"""Signed plan bundles: ed25519 keys, a detached signature, a trusted key set.

``splitgate keys -o DIR`` writes ``DIR/signing.key`` (PKCS#8 PEM, mode 0600)
and ``DIR/signing.pub`` (SubjectPublicKeyInfo PEM). ``splitgate sign BUNDLE
--key DIR/signing.key`` writes ``BUNDLE/signature.json``::

    {"schema": 1, "algorithm": "ed25519", "key_id": "<16 hex>",
     "model_name": "...", "plan_digest": "<sha256 hex>", "signature": "<base64>"}

The signed bytes are the plan digest's payload
(:func:`splitgate.planner._bundle.digest_payload`): the canonical manifest
without ``plan_digest`` and without the decision data (``DECISION_KEYS``:
profile, decision table, device record, and their files). The manifest lists
the sha256 of every partition file, so the signature covers every byte the
edge or the cloud runs; a device refit rewrites only decision data and keeps
the signature valid. ``signature.json`` is not listed in the manifest and
signing leaves the manifest (and ``plan_digest``) unchanged.

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public
key. ``cryptography`` is imported only when a key is read or made.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitgate.errors import BundleSignatureError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from splitgate.planner import PlanBundle

__all__ = [
    "ALGORITHM",
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "SIGNATURE_FILE",
    "TrustedKeys",
    "generate_signing_key",
    "key_id",
    "load_signing_key",
    "sign_bundle",
    "sign_payload",
    "verify_bundle",
    "verify_payload",
]

log = logging.getLogger("splitgate.security")

SIGNATURE_FILE = "signature.json"
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
ALGORITHM = "ed25519"
_SIGNATURE_SCHEMA = 1
_KEY_ID_HEX = 16

_warned_unchecked = threading.Event()  # the "bundles are not authenticated" line, once per process


def _crypto() -> Any:
    """The ``cryptography`` serialization and ed25519 modules (ConfigError naming the fix if missing)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError(
            "signed bundles need 'cryptography' (a splitgate dependency): pip install 'cryptography>=41'"
        ) from None
    return serialization, ed25519


def key_id(public_key: Ed25519PublicKey) -> str:
    """The short id of a public key: sha256 of its raw 32 bytes, first 16 hex digits.

    Args:
        public_key: an ed25519 public key.

    Returns:
        16 lowercase hex digits (what ``signature.json`` and error messages name).
    """
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:_KEY_ID_HEX]


# -- keys ---------------------------------------------------------------------


def generate_signing_key(out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Make an ed25519 key pair: ``out_dir/signing.key`` (mode 0600) and ``out_dir/signing.pub``.

    Args:
        out_dir: directory to write to (created if missing).

    Returns:
        (private key path, public key path).

    Raises:
        ConfigError: a key already exists there (never overwritten), the
            directory is not writable, or ``cryptography`` is missing.
    """
    serialization, ed25519 = _crypto()
    out = Path(out_dir)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists: refusing to overwrite a signing key (choose another -o DIR)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise ConfigError(f"cannot write the key pair to {out}: {exc.strerror or exc}") from None
    return private_path, public_path


def _load_private_key(key_path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an unencrypted ed25519 private key (PEM).

    Raises:
        ConfigError: missing or unreadable file, or not an ed25519 private key.
    """
    serialization, ed25519 = _crypto()
    path = Path(key_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"signing key {path}: cannot read it ({exc.strerror or exc}); "
                          "make one with `splitgate keys -o DIR`") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        detail = f"that is a public key: sign with {PRIVATE_KEY_FILE}" if b"PUBLIC KEY" in data else str(exc)
        raise ConfigError(f"signing key {path}: not an unencrypted PEM private key ({detail})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing key {path}: a {type(key).__name__}, not ed25519; "
                          "make one with `splitgate keys -o DIR`")
    return key


def _load_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """Parse an ed25519 public key (PEM).

    Raises:
        ConfigError: not a PEM ed25519 public key (a private key is named as such).
    """
    serialization, ed25519 = _crypto()
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"trusted key {where} is a private key: trust the public key "
                          f"({PUBLIC_KEY_FILE}) and keep the private one with the signer")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"trusted key {where}: not a PEM public key ({exc}); "
                          f"pass the {PUBLIC_KEY_FILE} written by `splitgate keys`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"trusted key {where}: a {type(key).__name__}, not ed25519")
    return key


class TrustedKeys:
    """The set of public keys whose bundle signatures are accepted, by key id.

    Build with :meth:`from_paths` (public key files) or :meth:`from_pems` (PEM
    text, e.g. what the cloud tier hands its Ray Serve replicas so they need
    no key files of their own).
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey], pems: Mapping[str, str]) -> None:
        self._keys = dict(keys)
        self._pems = dict(pems)

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        """Read public key files (``signing.pub`` from ``splitgate keys``).

        Args:
            paths: PEM public key files.

        Returns:
            The key set (empty for no paths).

        Raises:
            ConfigError: a file is missing or unreadable, or not an ed25519 public key.
        """
        if isinstance(paths, (str, os.PathLike)):  # one path, not its characters
            paths = [paths]
        pems: list[tuple[str, str]] = []
        for p in paths:
            path = Path(p)
            try:
                pems.append((path.read_text(encoding="ascii"), str(path)))
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigError(f"trusted key {path}: cannot read it ({reason}); pass the "
                                  f"{PUBLIC_KEY_FILE} written by `splitgate keys -o DIR`") from None
        return cls._build(pems)

    @classmethod
    def from_pems(cls, pems: Iterable[str]) -> TrustedKeys:
        """Build from PEM texts (see :meth:`pems`).

        Raises:
            ConfigError: a text is not an ed25519 public key.
        """
        return cls._build([(pem, f"#{i}") for i, pem in enumerate(pems)])

    @classmethod
    def _build(cls, pems: list[tuple[str, str]]) -> TrustedKeys:
        keys: dict[str, Ed25519PublicKey] = {}
        texts: dict[str, str] = {}
        for pem, where in pems:
            key = _load_public_key(pem.encode("ascii", "replace"), where)
            kid = key_id(key)
            keys[kid], texts[kid] = key, pem
        return cls(keys, texts)

    @property
    def ids(self) -> list[str]:
        """Key ids in the set, sorted."""
        return sorted(self._keys)

    @property
    def pems(self) -> list[str]:
        """The keys as PEM texts (for :meth:`from_pems`), in id order."""
        return [self._pems[k] for k in self.ids]

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """The key with this id, or None."""
        return self._keys.get(kid)

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"<TrustedKeys {self.ids}>"


# -- sign and verify -------------------------------------------------------------


def _payload(bundle: PlanBundle) -> bytes:
    """The bytes a bundle's signature covers (the plan digest's payload)."""
    from splitgate.planner._bundle import digest_payload

    return digest_payload(bundle.manifest)


def sign_bundle(bundle_dir: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> Path:
    """Sign a plan bundle: write the detached ``bundle_dir/signature.json``.

    The bundle is verified first (every file's sha256, the plan digest), so
    only a whole bundle is signed; its manifest is left unchanged. An existing
    signature is replaced.

    Args:
        bundle_dir: the plan bundle directory.
        key_path: the ed25519 private key (``signing.key`` from ``splitgate keys``).

    Returns:
        The path of ``signature.json``.

    Raises:
        BundleError: the bundle is missing, malformed or fails its integrity check.
        ConfigError: the key cannot be read or is not an ed25519 private key, or
            the signature cannot be written.
    """
    from splitgate.planner import PlanBundle

    key = _load_private_key(key_path)
    bundle = PlanBundle.load(bundle_dir)
    document = {
        "schema": _SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "model_name": bundle.model_name,
        "plan_digest": bundle.plan_digest,
        "signature": base64.b64encode(key.sign(_payload(bundle))).decode("ascii"),
    }
    path = bundle.root / SIGNATURE_FILE
    tmp = path.with_name(f".{SIGNATURE_FILE}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _refuse(bundle: PlanBundle, problem: str, fix: str) -> BundleSignatureError:
    """A :class:`BundleSignatureError` naming the bundle, the problem and the fix."""
    return BundleSignatureError(f"bundle '{bundle.model_name}' at {bundle.root}: {problem}; {fix}")


def _read_signature(bundle: PlanBundle) -> dict[str, Any] | None:
    """The parsed ``signature.json``, or None when the bundle has none.

    Raises:
        BundleSignatureError: the file is unreadable or malformed.
    """
    path = bundle.root / SIGNATURE_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(bundle, f"{SIGNATURE_FILE} is unreadable ({exc})", "re-sign it with `splitgate sign`") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("algorithm", "key_id", "signature")):
        raise _refuse(bundle, f"{SIGNATURE_FILE} is malformed (needs algorithm, key_id, signature)",
                      "re-sign it with `splitgate sign`")
    return doc


def _check_signature(bundle: PlanBundle, doc: dict[str, Any], trusted: TrustedKeys) -> str:
    """Verify a parsed signature against the trusted keys; return the signer's key id.

    Raises:
        BundleSignatureError: wrong algorithm, a key outside the set, or a
            signature that does not verify over this bundle's payload.
    """
    from cryptography.exceptions import InvalidSignature

    if doc["algorithm"] != ALGORITHM:
        raise _refuse(bundle, f"signature algorithm {doc['algorithm']!r} is not supported (only {ALGORITHM})",
                      "re-sign it with `splitgate sign`")
    kid = doc["key_id"]
    key = trusted.get(kid)
    if key is None:
        raise _refuse(bundle, f"signed by key {kid}, which is not in the trusted set {trusted.ids}",
                      "add that signer's public key with --trust (GatewayConfig/CloudConfig.trust) "
                      "or re-sign the bundle with a trusted key")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        key.verify(signature, _payload(bundle))
    except (InvalidSignature, binascii.Error, ValueError):
        signed = str(doc.get("plan_digest", "?"))[:12]
        raise _refuse(
            bundle,
            f"signature by key {kid} does not verify (signed plan {signed}, bundle plan "
            f"{bundle.plan_digest[:12]}): the bundle changed after it was signed",
            "do not serve it; rebuild it from a trusted source and re-sign it with `splitgate sign`",
        ) from None
    return kid


def verify_bundle(
    bundle_or_dir: PlanBundle | str | os.PathLike[str],
    trusted: TrustedKeys | None,
    *,
    allow_unsigned: bool = False,
) -> str | None:
    """Check that a plan bundle is signed by a trusted key.

    With no trusted keys (None or empty) nothing is checked and one WARNING per
    process says bundles are not authenticated. With keys, a bundle without
    ``signature.json`` is refused unless ``allow_unsigned`` (then a WARNING per
    call); a signature that does not verify, or one by a key outside the set,
    is always refused.

    Args:
        bundle_or_dir: a loaded bundle (its manifest as loaded is checked) or a
            bundle directory (loaded and integrity-checked first: every file's
            sha256 and the plan digest).
        trusted: the accepted public keys.
        allow_unsigned: accept unsigned bundles (development only).

    Returns:
        The signer's key id, or None when unsigned-and-allowed or not checked.

    Raises:
        BundleSignatureError: unsigned (and not allowed), a bad signature, or
            an untrusted signer.
        BundleError: a directory that is not a whole plan bundle.
    """
    from splitgate.planner import PlanBundle

    bundle = bundle_or_dir if isinstance(bundle_or_dir, PlanBundle) else PlanBundle.load(bundle_or_dir)
    if not trusted:
        if not _warned_unchecked.is_set():
            _warned_unchecked.set()
            log.warning("plan bundle signatures are not checked (no trusted keys): bundles are not "
                        "authenticated; set trust (--trust signing.pub) to refuse unsigned or tampered bundles")
        return None
    doc = _read_signature(bundle)
    if doc is None:
        if allow_unsigned:
            log.warning("loading UNSIGNED bundle '%s' at %s (allow_unsigned: development only)",
                        bundle.model_name, bundle.root)
            return None
        raise _refuse(bundle, "it is unsigned and unsigned bundles are not allowed",
                      "sign it with `splitgate sign BUNDLE --key signing.key` (or, for development only, "
                      "pass --allow-unsigned)")
    return _check_signature(bundle, doc, trusted)


# -- signed documents other than bundles (the update index) ------------------------


def load_signing_key(key_path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read an ed25519 private key (``signing.key`` from ``splitgate keys``).

    Args:
        key_path: the PEM file (unencrypted PKCS#8).

    Returns:
        The private key (for :func:`sign_payload`).

    Raises:
        ConfigError: missing or unreadable file, a public key, or not ed25519.
    """
    return _load_private_key(key_path)


def sign_payload(payload: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """Sign bytes with an ed25519 key.

    Args:
        payload: the bytes to sign (e.g. :func:`splitgate.planner._bundle.canonical_json` of a document).
        key: a private key from :func:`load_signing_key`.

    Returns:
        ``{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``.
    """
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(payload)).decode("ascii"),
    }


def verify_payload(
    payload: bytes,
    signatures: Iterable[Any],
    trusted: TrustedKeys,
    *,
    what: str,
    fix: str,
    error: type[BundleSignatureError] = BundleSignatureError,
) -> str:
    """Check that at least one of ``signatures`` (as :func:`sign_payload` makes them)
    is a valid ed25519 signature over ``payload`` by a key in ``trusted``.

    Args:
        payload: the signed bytes.
        signatures: signature objects; malformed ones and ones by keys outside
            the set are passed over (a document may carry several signers).
        trusted: the accepted public keys (non-empty).
        what: the document, for messages (e.g. "update index http://.../index.json").
        fix: what to do about a bad or foreign signature, for messages.
        error: the exception class raised.

    Returns:
        The key id of the first trusted signature that verifies.

    Raises:
        BundleSignatureError (or ``error``): no signature, none by a trusted key,
            or a trusted key's signature that does not verify (the document
            changed after it was signed).
    """
    from cryptography.exceptions import InvalidSignature

    docs = [s for s in signatures if isinstance(s, Mapping)
            and all(isinstance(s.get(k), str) for k in ("algorithm", "key_id", "signature"))]
    if not docs:
        raise error(f"{what}: it carries no well-formed signature; {fix}")
    ours = [s for s in docs if s["algorithm"] == ALGORITHM and trusted.get(s["key_id"]) is not None]
    if not ours:
        signers = sorted({str(s["key_id"]) for s in docs})
        raise error(f"{what}: signed by key(s) {signers}, none of them in the trusted set {trusted.ids}; "
                    "add that signer's public key with --trust (GatewayConfig.trust) or re-sign with a trusted key")
    for doc in ours:
        try:
            trusted.get(doc["key_id"]).verify(base64.b64decode(doc["signature"], validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            continue
        return str(doc["key_id"])
    raise error(f"{what}: the signature by key {ours[0]['key_id']} does not verify: "
                f"it changed after it was signed; {fix}")
