"""Dead letters keep no plaintext user id: JSON values have it hashed in place, in the
form the parser takes as already hashed; anything else is sealed, and unseals to the
bytes received."""

from __future__ import annotations

import json

import pytest

from pipeline.feedback.events import HASHED_USER_ID, EventParser, hash_user
from pipeline.feedback.redact import SEALED, redact_value, unseal_value
from pipeline.feedback.sample import sample_events
from tests.conftest import HASH_KEY

KEY = HASH_KEY.encode()
HASHED = (HASHED_USER_ID + hash_user("ann", KEY)).encode()


def test_every_user_id_key_is_hashed_in_place_and_every_other_byte_kept() -> None:
    raw = b'{"user_id" : "ann", "x": [{"user_id":"ann"}], "user_id": "ann", "n": 1.50}'
    assert redact_value(raw, KEY) == raw.replace(b'"ann"', b'"' + HASHED + b'"')


def test_a_redacted_value_is_not_hashed_again() -> None:
    once = redact_value(b'{"user_id": "ann"}', KEY)
    assert redact_value(once, KEY) == once


def test_a_replayed_dead_letter_counts_for_the_same_user() -> None:
    event = next(sample_events(1, seed=2)) | {"user_id": "ann"}
    parse = EventParser(KEY)
    replayed = parse(redact_value(json.dumps(event).encode(), KEY))
    assert replayed.user_hash == parse(json.dumps(event).encode()).user_hash


@pytest.mark.parametrize(
    "raw",
    [
        b"user_id=ann&feedback=like",  # not JSON
        b'{"user_id": "ann", ',  # cut short
        b'{"user\\u005fid": "ann"}',  # a key the rewrite cannot see
        b'{"user_id": 12345}',  # not a string
        b'{"user_id": "\\ud800ann"}',  # no text to hash
        b"\xff" + b'{"user_id": "ann"}',  # not UTF-8
    ],
)
def test_a_value_the_rewrite_cannot_clean_is_sealed_and_unseals_to_what_came(raw: bytes) -> None:
    sealed = redact_value(raw, KEY)
    assert sealed.startswith(SEALED) and b"ann" not in sealed and b"12345" not in sealed
    assert unseal_value(sealed, KEY) == raw
    assert redact_value(sealed, KEY) == sealed
    with pytest.raises(ValueError, match="another \\[events\\] user_hash_key"):
        unseal_value(sealed, b"another key")


def test_a_value_without_a_user_id_is_kept_as_it_came() -> None:
    raw = b'{"event_id": "e1", "user_id": null}'
    assert redact_value(raw, KEY) == raw
