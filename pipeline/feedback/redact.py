"""Dead letters without plaintext user ids: the value a dead letter keeps for replay.

A message that cannot be stored is kept with its bytes, so that it can be replayed
once its producer is fixed; those bytes would hold the user id the store never keeps.
`redact_value` keeps them readable where it can and useful for replay always:

- A JSON value has each `"user_id": "<id>"` (at any depth) rewritten in place to
  `"user_id": "kto-user-hash:<the keyed hash of id>"`, every other byte kept as
  sent. The event parser takes a user_id of that form as the hash it names
  (`events.HASHED_USER_ID`), so a replayed dead letter lands on the same user as
  the rest of that user's votes, never on a hash of the hash.
- A value that is not JSON (invalid UTF-8, a syntax error, nesting too deep), or a
  JSON value whose `user_id` is not a string or is spelt with escapes, may hold the
  id anywhere: it is sealed whole, `SEALED` followed by a 12-byte nonce and its
  AES-256-GCM ciphertext, under a key derived from the user-hash key (HKDF-SHA256).
  `unseal_value` gives the bytes back, for replay, to whoever holds that key.

Either way a value already redacted is left as it is, so a replay that fails again
is not hashed or sealed twice.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pipeline.feedback.events import HASHED_USER_ID, hash_user, is_hashed_user_id

SEALED = b"kto-sealed-v1:"
_NONCE_BYTES = 12
_SEAL_INFO = b"kto-loop dead-letter value"
_USER_KEY = "user_id"
# A "user_id" key and its string value. In valid JSON an unescaped quote only starts or
# ends a string, so this finds keys, never text inside a string.
_USER_ID = re.compile(rb'"user_id"(\s*:\s*)"((?:[^"\\]|\\.)*)"')


def redact_value(value: bytes | None, user_hash_key: bytes) -> bytes | None:
    """`value` with its user ids hashed in place (JSON) or sealed (anything else).

    Args:
        value: a Kafka message value as received.
        user_hash_key: the `[events] user_hash_key` that hashes user ids at ingest.

    Returns:
        The bytes to keep: no user id in plaintext.
    """
    if not value or value.startswith(SEALED):
        return value
    try:
        parsed = _parse(value)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return seal_value(value, user_hash_key)
    if not _has_user_id(parsed):
        return value

    def hashed(match: re.Match[bytes]) -> bytes:
        user_id = json.loads(b'"' + match.group(2) + b'"')
        if not is_hashed_user_id(user_id):
            user_id = HASHED_USER_ID + hash_user(user_id, user_hash_key)
        return b'"user_id"' + match.group(1) + json.dumps(user_id).encode()

    try:
        redacted = _USER_ID.sub(hashed, value)
    except UnicodeEncodeError:  # a lone surrogate escape: no text to hash
        return seal_value(value, user_hash_key)
    if _has_user_id(_parse(redacted), plain_only=True):
        return seal_value(value, user_hash_key)  # an id the rewrite could not reach
    return redacted


def seal_value(value: bytes, user_hash_key: bytes) -> bytes:
    """`value` encrypted whole (SEALED, nonce, AES-GCM ciphertext)."""
    nonce = os.urandom(_NONCE_BYTES)
    return SEALED + nonce + AESGCM(_seal_key(user_hash_key)).encrypt(nonce, value, SEALED)


def unseal_value(value: bytes, user_hash_key: bytes) -> bytes:
    """The bytes `seal_value` sealed; any other value as it is.

    Raises:
        ValueError: the value is sealed under another user-hash key, or was cut (the
            dead-letter topic truncates values past its size limit; the store's
            dead_letters table keeps them whole).
    """
    if not value.startswith(SEALED):
        return value
    body = value[len(SEALED) :]
    nonce, sealed = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
    try:
        return AESGCM(_seal_key(user_hash_key)).decrypt(nonce, sealed, SEALED)
    except (InvalidTag, ValueError) as exc:
        raise ValueError(
            "cannot unseal the dead letter: it was sealed under another [events] "
            "user_hash_key, or cut short (read it from the store's dead_letters table)"
        ) from exc


def _seal_key(user_hash_key: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(
        user_hash_key
    )


class _Object(list):
    """A parsed JSON object as its (key, value) pairs: a key sent twice is there twice."""


def _parse(value: bytes) -> Any:
    return json.loads(value.decode("utf-8"), object_pairs_hook=_Object)


def _has_user_id(value: Any, plain_only: bool = False) -> bool:
    """Whether a value from `_parse` holds a non-null `user_id` at any depth (with
    plain_only, one that is not in the hashed form). Walks without recursion."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _Object):
            for key, inner in item:
                hidden = plain_only and is_hashed_user_id(inner)
                if key == _USER_KEY and inner is not None and not hidden:
                    return True
                pending.append(inner)
        elif isinstance(item, list):
            pending.extend(item)
    return False
