"""Who a vote posted over HTTP is from, and when it was given: what `serve-feedback`
decides for the client, never takes from it.

Identity. A request carries an API key (`[feedback_http] api_keys`):
- a *trusted* key (`trusted_keys`, your backend's server-to-server key) may name the
  user of each event (`user_id`), as a Kafka producer does;
- any other key is a *browser* key: it is in page JavaScript, so it names no one. The
  user comes from a token your backend signs for the signed-in user (a JWT, HS256 with
  `user_token_secret`, `sub` = the user id, `aud` = `user_token_audience`, an `exp`),
  sent as `X-User-Token`. An event whose `user_id` is not the token's user is refused;
  one without is the token's user's;
- without a token, a browser key's votes are anonymous, refused unless
  `anonymous_votes`; then every vote from one client address is one voter's
  (`anonymous:<keyed hash of the address>`), under that voter's rate limit.

Ids. Each event_id is put in its voter's namespace, `<namespace>:<event_id>`, with the
namespace `k.<key name>` for a trusted key, `u.<hash of the user>` for a token's user and
`a.<hash of the address>` for an anonymous one: no one can send an id that equals
another voter's, and a client retrying with its own id still dedupes.

Time. Which of a voter's votes is the latest is decided by `ts`. Here it is the
client's `ts` clamped to [receive time - skew, receive time] (`[events]
clock_skew_seconds`): a vote dated in the future or the distant past takes the
endpoint's clock. The Kafka record is stamped with the receive time too, and ingest
clamps every event's ts to at most its record's timestamp (and the ingest clock) plus
the skew, which is what a producer writing to the topic directly gets.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import jwt
import msgspec

from connectors.config import FeedbackHttpConfig
from pipeline.feedback.events import FeedbackEvent, WireEventV1, hash_user

# Seconds of clock difference allowed on a token's exp and nbf.
_TOKEN_LEEWAY = 30


class Refused(Exception):
    """The request may not post these votes: `status` (401 or 403) and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Caller:
    """What a request proves about who sends it."""

    key: str  # the API key's name ("anonymous" for a keyless request)
    trusted: bool  # the key may name users
    user: str | None  # the user of a verified token
    address: str  # the client's address


@dataclass(frozen=True)
class Voter:
    """Whose vote an event is: the user_id it goes on with (`as_sent`: the event's own,
    from a trusted key), its event ids' namespace, and who the per-user rate limit
    charges (None: no one)."""

    user_id: str | None
    namespace: str
    charged: str | None
    as_sent: bool = False


class UserTokens:
    """Verifies the tokens an app's backend signs for its users."""

    def __init__(self, config: FeedbackHttpConfig) -> None:
        secret = config.user_token_secret
        self._secret = secret.get_secret_value() if secret else None
        self._audience = config.user_token_audience
        self._issuer = config.user_token_issuer

    def user(self, token: str) -> str:
        """The user the token names.

        Raises:
            Refused: 401, no secret configured or a token that does not verify.
        """
        if self._secret is None:
            raise Refused(
                401,
                "user tokens are not accepted: [feedback_http] user_token_secret is not set "
                "(set KTO_LOOP_FEEDBACK_HTTP__USER_TOKEN_SECRET on the endpoint and sign tokens "
                "with it in your backend)",
            )
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=_TOKEN_LEEWAY,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise Refused(
                401,
                f"the X-User-Token does not verify ({type(exc).__name__}): sign it with HS256 and "
                f"[feedback_http] user_token_secret, with sub = the user id, aud = "
                f"{self._audience!r} and an exp in the future",
            ) from None
        user = claims["sub"]
        if not isinstance(user, str) or not user:
            raise Refused(401, "the X-User-Token's sub must be the user id, a non-empty string")
        return user


class Voters:
    """Decides each event's voter for a caller (see the module's docstring)."""

    def __init__(self, hash_key: bytes, anonymous_votes: bool) -> None:
        self._key = hash_key
        self._anonymous = anonymous_votes

    def _hash(self, value: str) -> str:
        return hash_user(value, self._key)

    def of(self, caller: Caller, event: FeedbackEvent) -> Voter:
        """The voter of `event` as `caller` posted it.

        Raises:
            Refused: 403, the event names a user the caller may not speak for, or is
                anonymous while anonymous votes are off.
        """
        if caller.trusted:
            return Voter(None, f"k.{caller.key}", event.user_hash, as_sent=True)
        if caller.user is not None:
            mine = self._hash(caller.user)
            if event.user_hash is not None and event.user_hash != mine:
                raise Refused(
                    403,
                    "the event's user_id is not the X-User-Token's user: leave user_id out (the "
                    "token says who votes) or send it through a trusted key",
                )
            return Voter(caller.user, f"u.{mine[:16]}", mine)
        if event.user_hash is not None:
            raise Refused(
                403,
                f"the key {caller.key!r} may not name users (user_id): send the signed-in user's "
                "token as X-User-Token, signed by your backend, or post from your backend with "
                "a key in [feedback_http] trusted_keys",
            )
        if not self._anonymous:
            raise Refused(
                403,
                "votes without a user are off: send the user's X-User-Token, or set "
                "[feedback_http] anonymous_votes = true to count each client address as one voter",
            )
        address = self._hash(caller.address)
        return Voter(f"anonymous:{address}", f"a.{address[:16]}", f"a.{address}")


def clamp(ts: dt.datetime, received: dt.datetime, skew: dt.timedelta) -> dt.datetime | None:
    """`ts` within [received - skew, received], in UTC; None when it is within already."""
    low = received - skew
    if low <= ts <= received:
        return None
    return min(max(ts.astimezone(dt.UTC), low), received)


# The wire event's fields as raw JSON: a stamped event keeps every value's bytes but
# those the endpoint decides (fields the wire event does not declare are left out:
# ingest would ignore them).
_Stamped = msgspec.defstruct(
    "_Stamped",
    [(name, msgspec.Raw, msgspec.Raw()) for name in WireEventV1.__struct_fields__],
    omit_defaults=True,
)
_decode_stamped = msgspec.json.Decoder(_Stamped).decode
_encode = msgspec.json.Encoder().encode


def stamped(
    raw: bytes, event: FeedbackEvent, voter: Voter, ts: dt.datetime | None
) -> tuple[bytes, str]:
    """The event as it goes to the topic, with the voter's user_id, the namespaced
    event_id and `ts` (None: its own); and that event_id. `raw` has been validated
    (`event` is it)."""
    event_id = f"{voter.namespace}:{event.event_id}"
    changes: dict[str, Any] = {"event_id": msgspec.Raw(_encode(event_id))}
    if ts is not None:
        changes["ts"] = msgspec.Raw(_encode(ts.isoformat().replace("+00:00", "Z")))
    if not voter.as_sent:
        changes["user_id"] = msgspec.Raw(_encode(voter.user_id))
    return _encode(msgspec.structs.replace(_decode_stamped(raw), **changes)), event_id
