"""Configuration: one TOML file plus environment overrides, validated once at the entry point.

Each concern has its own small model; `[train]`, `[lora]`, `[balance]` and `[gate]` are
the pipeline's own TrainOptions, LoraOptions, BalanceOptions and GateOptions, which hold
their fields, bounds and defaults. `[snapshot]` and `[events]` are the pipeline's
SnapshotOptions and RatingPolicy with the settings only I/O reads added (where snapshots
are written, the user-hash key). Environment variables override the file:
`KTO_LOOP_<SECTION>__<KEY>`, e.g. `KTO_LOOP_KAFKA__BOOTSTRAP_SERVERS='["kafka:9092"]'`
or `KTO_LOOP_EVENTS__USER_HASH_KEY=...`. Secrets (SASL password, the user-hash key)
belong in the environment, not in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.feedback.balance import BalanceOptions
from pipeline.feedback.events import RatingPolicy
from pipeline.feedback.snapshot import SnapshotOptions
from pipeline.promotion.canary import CanaryRules
from pipeline.promotion.gate import GateOptions
from pipeline.serving.registry import KEEP_ROLLBACKS, RegistryError, check_alias
from pipeline.training.options import RUN_CONTROLS, LoraOptions, LoraRank, TrainOptions

ENV_PREFIX = "KTO_LOOP_"
CONFIG_ENV = "KTO_LOOP_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaConfig(_Section):
    """Where the feedback topic lives and how to reach it. Security settings are passed
    to kafka-python as they are; `client_options` passes any other kafka-python option."""

    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:9092"], min_length=1)
    topic: str = Field("chat-feedback", min_length=1)
    dlq_topic: str | None = Field(None, description="defaults to '<topic>.dlq'")
    group_id: str = Field("kto-loop-ingest", min_length=1)
    client_id: str = "kto-loop"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    create_topics: bool = Field(True, description="create the topic and its DLQ when missing")
    partitions: int = Field(6, ge=1, description="partitions for topics kto-loop creates")
    replication_factor: int = Field(1, ge=1)
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(2_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None
    ) = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    client_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> KafkaConfig:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                "heartbeat_interval_ms must be at most a third of session_timeout_ms, got "
                f"{self.heartbeat_interval_ms} and {self.session_timeout_ms}"
            )
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        return self

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security options common to kafka-python's clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
        if self.sasl_plain_username is not None:
            kwargs["sasl_plain_username"] = self.sasl_plain_username
        if self.sasl_plain_password is not None:
            kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.ssl_password is not None:
            kwargs["ssl_password"] = self.ssl_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
        kwargs.update(self.client_options)
        return kwargs


class StoreConfig(_Section):
    """The feedback store: a local directory or any fsspec URL (s3://, gs://, ...).
    Credentials come from the environment the fsspec backend reads, or storage_options."""

    url: str = Field("./data/store", min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class IngestConfig(_Section):
    """How the consumer batches, bounds and reports."""

    batch_max_events: int = Field(5000, ge=1)
    batch_max_bytes: int = Field(
        64 << 20,
        ge=1024,
        description="a batch closes once its messages (keys and values) reach this many "
        "bytes, or batch_max_events, whichever comes first; bounds the consumer's memory",
    )
    batch_max_seconds: float = Field(5.0, gt=0)
    max_event_bytes: int = Field(1 << 20, ge=1024)
    dlq_max_message_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="a dead letter larger than this is truncated on the DLQ topic "
        "(the store keeps it whole)",
    )
    log_interval_seconds: float = Field(30.0, gt=0)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint; 0 = off")
    connect_timeout_seconds: float = Field(
        0.0, ge=0, description="give up when the broker stays away this long; 0 = never"
    )
    store_attempts: int = Field(
        6,
        ge=1,
        description="tries at storing a batch, at sending its dead letters and at settling "
        "an assigned partition's files, before ingest exits (code 1)",
    )
    store_retry_wait_seconds: float = Field(
        0.5, gt=0, description="wait before the second try; doubles each time, at most 10 s"
    )


HASH_KEY_MIN_HEX = 32


def _is_strong_hex_key(key: str) -> bool:
    # Eight distinct digits: a random 32-digit key has fewer once in tens of millions;
    # "0000..." or "abababab..." is not random.
    return (
        len(key) >= HASH_KEY_MIN_HEX
        and all(c in "0123456789abcdefABCDEF" for c in key)
        and len(set(key.lower())) >= 8
    )


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EventsConfig(RatingPolicy):
    """How events become labels, and the key of the hash that replaces user ids."""

    user_hash_key: Annotated[
        SecretStr | None,
        Field(
            description="secret key of the user-id hash, at least 128 bits of random hex; "
            "set KTO_LOOP_EVENTS__USER_HASH_KEY"
        ),
    ] = None
    clock_skew_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="how far a vote's ts may stray from the time it reached us (the "
            "endpoint's receive time; at ingest, the Kafka record's timestamp and the "
            "ingest clock): a ts past it is clamped to it",
        ),
    ] = 300.0

    @field_validator("user_hash_key")
    @classmethod
    def _strong_key(cls, value: SecretStr | None) -> SecretStr | None:
        # A weak key makes the hashes of user ids guessable: with a dictionary of
        # likely ids (emails), anyone holding the store could undo them.
        if value is not None and not _is_strong_hex_key(value.get_secret_value()):
            raise ValueError(
                f"must be at least {HASH_KEY_MIN_HEX} random hex digits (128 bits); make one "
                "with `openssl rand -hex 32` or `python -c 'import secrets; "
                "print(secrets.token_hex(32))'` and keep it stable"
            )
        return value


class FeedbackHttpConfig(_Section):
    """`kto-loop serve-feedback`: the HTTP endpoint in front of the feedback topic.

    API keys are named (`{name = key}`): the name labels metrics, logs and the per-key
    rate limit, the key itself stays secret (KTO_LOOP_FEEDBACK_HTTP__API_KEYS='{"web":
    "..."}'). A key is a browser key unless `trusted_keys` names it: a browser key cannot
    name a user, its votes are the user's of a token signed with `user_token_secret`
    (`X-User-Token`), or anonymous when `anonymous_votes` allows. Rate limits are in
    `limits` notation ("20/second;600/minute") and count events, not requests."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8088, ge=0, le=65535)
    api_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="name -> key; clients send `Authorization: Bearer KEY`"
    )
    allow_anonymous: bool = Field(
        False, description="accept requests without a key (a local try-out only)"
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="names of api_keys that may send `user_id` (your backend's "
        "server-to-server keys, never one in a web page)",
    )
    user_token_secret: SecretStr | None = Field(
        None,
        description="HS256 key your backend signs user tokens with (JWT, `sub` = the user); "
        "set KTO_LOOP_FEEDBACK_HTTP__USER_TOKEN_SECRET",
    )
    user_token_audience: str = Field(
        "kto-loop-feedback", min_length=1, description="the `aud` a user token must carry"
    )
    user_token_issuer: str | None = Field(None, description="the `iss` it must carry, if set")
    anonymous_votes: bool = Field(
        False,
        description="accept votes without a user (no token, no trusted key): each client "
        "address is then one voter, under rate_per_user",
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        description="proxies whose X-Forwarded-For names the client address (e.g. "
        '["10.0.0.5"]); empty: the connection\'s own address',
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to post, e.g. https://chat.example.com",
    )
    rate_per_key: str = Field("2000/second", description="events per API key")
    rate_per_user: str = Field(
        "5/second;300/hour",
        description="events per voter: a token's user, a trusted key's user_id, or an "
        "anonymous client address",
    )
    rate_limit_storage: str = Field(
        "memory://",
        description="where rate-limit counters live: memory:// (per process) or redis://host:6379 "
        "(shared by every replica of the endpoint)",
    )
    max_events_per_request: int = Field(1000, ge=1)
    produce_timeout_seconds: float = Field(
        10.0, gt=0, description="longest wait for the broker's acknowledgement before a 503"
    )
    max_in_flight_bytes: int = Field(
        16 << 20,
        ge=1 << 16,
        description="events handed to the broker and not yet acknowledged, at most; past "
        "it (a stalled broker) requests are answered 503 at once",
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections and requests at once; past it, 503"
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this, or it is closed"
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="its body must arrive within this, or it is answered 408"
    )

    @field_validator("rate_per_key", "rate_per_user")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError(
                f'{value!r} is not a rate limit; write e.g. "20/second" or "5/second;300/hour"'
            ) from None
        return value

    @field_validator("user_token_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError(
                "is shorter than 32 characters (HS256 wants 256 bits); make one with "
                "`openssl rand -hex 32`"
            )
        return value

    @model_validator(mode="after")
    def _trusted_are_keys(self) -> FeedbackHttpConfig:
        unknown = sorted(set(self.trusted_keys) - set(self.api_keys))
        if unknown and self.api_keys:
            raise ValueError(
                f"trusted_keys names {', '.join(unknown)}, which api_keys does not hold; "
                f"its keys are {', '.join(sorted(self.api_keys))}"
            )
        return self

    @field_validator("api_keys")
    @classmethod
    def _long_keys(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        short = [name for name, key in value.items() if len(key.get_secret_value()) < 16]
        if short:
            raise ValueError(
                f"the keys named {', '.join(short)} are shorter than 16 characters; make one "
                "with `openssl rand -hex 24`"
            )
        return value


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SnapshotConfig(SnapshotOptions):
    """How feedback becomes a training snapshot, and where snapshots are written."""

    out_dir: Annotated[str, Field(min_length=1, description="a local directory")] = (
        "./data/snapshots"
    )


class RegistryConfig(_Section):
    """Where adapter versions and alias histories are kept: a local directory or any
    fsspec URL. Servers must be able to read the version directories (see [serving]
    path_map)."""

    url: str = Field("./data/adapters", min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    keep_last: int = Field(5, ge=1, description="newest versions `adapters gc` always keeps")
    keep_rollbacks: int = Field(
        KEEP_ROLLBACKS,
        ge=0,
        description="rollbacks in a row each alias can make: `kto-loop gc` keeps the versions "
        "they return to",
    )


class ServingConfig(_Section):
    """The vLLM replicas an alias is published to, all or nothing."""

    replicas: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        min_length=1,
        description="base URLs of every vLLM replica serving the alias",
    )
    api_key: SecretStr | None = Field(None, description="vLLM's --api-key; use the environment")
    admin_key: SecretStr | None = Field(
        None,
        description="the servers' KTO_LOOP_ADMIN_KEY, sent on control-plane calls only (load, "
        "swap, retire); set KTO_LOOP_SERVING__ADMIN_KEY in the environment",
    )
    max_lora_rank: LoraRank = Field(
        8, description="the servers' --max-lora-rank; higher-rank adapters are refused"
    )
    base_model: str | None = Field(
        None,
        description="the served base model's directory as the pipeline sees it; enables "
        "the base-model checks (module shapes, fingerprint) before publishing",
    )
    path_map: dict[str, str] = Field(
        default_factory=dict,
        description="registry path prefix (pipeline's view) -> the same directory as the "
        "servers see it, for a shared filesystem mounted in different places",
    )
    timeout_seconds: float = Field(30.0, gt=0)
    retries: int = Field(3, ge=1, description="attempts for calls that are safe to repeat")
    smoke_prompt: str = Field("Hello", min_length=1)
    smoke_max_tokens: int = Field(8, ge=1)

    @field_validator("admin_key")
    @classmethod
    def _admin_key_differs(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # A field validator, so that an error names [serving] admin_key and never shows it.
        api_key = info.data.get("api_key")
        if (
            value is not None
            and api_key is not None
            and value.get_secret_value() == api_key.get_secret_value()
        ):
            raise ValueError(
                "admin_key equals api_key, which every inference client holds: give the "
                "servers (KTO_LOOP_ADMIN_KEY) and kto-loop a different admin key"
            )
        return value

    def server_path(self, local: str) -> str:
        """Translate a registry path to the servers' view with the longest matching prefix."""
        for prefix in sorted(self.path_map, key=len, reverse=True):
            if local == prefix or local.startswith(prefix.rstrip("/") + "/"):
                return self.path_map[prefix].rstrip("/") + local[len(prefix.rstrip("/")) :]
        return local


class CycleConfig(_Section):
    """The alignment cycle: which alias it feeds, when it runs, when it has enough new
    feedback to bother, and where it keeps its working state (local disk)."""

    alias: str = Field("chat", min_length=1, description="the served alias a cycle trains for")
    cron: str = Field("0 2 * * *", min_length=1, description="when `kto-loop schedule` runs it")
    timezone: str = Field("UTC", min_length=1, description="the cron's time zone (IANA name)")
    min_new_votes: int = Field(
        50,
        ge=1,
        description="counted votes the store must have gained since the last run the gate judged",
    )
    work_dir: str = Field(
        "./data/cycles",
        min_length=1,
        description="local directory: per alias, the candidate being trained, run records "
        "and reports, and the lock that keeps one run at a time",
    )
    lock_wait_seconds: float = Field(
        0.0, ge=0, description="how long a run waits for a running one of the same alias"
    )

    @field_validator("alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        try:
            return check_alias(value)
        except RegistryError as exc:
            raise ValueError(str(exc)) from None

    publish_retries: int = Field(
        2, ge=0, description="retries of a publish that failed on an unreachable replica"
    )
    publish_retry_delay_seconds: float = Field(30.0, ge=0)
    chat_template: str | None = Field(
        None, description="Jinja chat template file, for a base model whose tokenizer has none"
    )
    general_data: str | None = Field(
        None, description="general held-out records (TRL file) whose NLL is watched in training"
    )
    strategy: Literal["retrain", "continual"] = Field(
        "retrain",
        description="retrain: a fresh LoRA from the base on the feedback of the last "
        "window_days, reference the base; continual: warm start from the served adapter, "
        "reference the served adapter, on the votes gained since the last judged run plus "
        "a replay sample of older ones (the first night, with nothing served, retrains)",
    )
    window_days: float | None = Field(
        None, gt=0, description="retrain: only votes cast this many days back; None: all"
    )
    replay_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="continual: the share of the training examples drawn from older votes, "
        "so that the adapter does not forget them",
    )
    on_shift: Literal["retrain", "shorten", "ignore"] = Field(
        "retrain",
        description="when the served version's liked share falls below its own past (the "
        "users' taste shifted): retrain from the base with the half-life shortened to the "
        "votes since the last judged run; shorten the half-life and keep the strategy; or "
        "only record it",
    )
    shift_alpha: float = Field(
        0.01, gt=0, lt=0.5, description="the chance of calling a shift where there is none"
    )


class CanaryConfig(_Section):
    """Canary rollout: a cycle's candidate serves a share of the alias's conversations
    beside the served version, and live votes on the two decide (pipeline/promotion/
    canary.py). Off by default: the cycle publishes to everyone at once."""

    enabled: bool = Field(
        False, description="the cycle starts a canary instead of publishing to everyone"
    )
    share: float = Field(
        0.1, gt=0, lt=1, description="the share of conversations the candidate answers"
    )
    min_effect: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="promote only when the candidate's liked share is higher by at least "
        "this (0.02 = 2 points), at the always-valid confidence 1 - alpha",
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="the chance of a false promotion or rollback"
    )
    min_votes: int = Field(50, ge=1, description="votes each arm needs before any decision")
    max_votes: int = Field(
        5000, ge=1, description="votes on both arms after which the canary stops inconclusive"
    )
    max_hours: float = Field(
        72.0, gt=0, description="hours after which the canary stops inconclusive"
    )
    check_every_minutes: float = Field(
        10.0, gt=0, description="how often `kto-loop schedule` checks a running canary"
    )
    on_new_candidate: Literal["wait", "replace"] = Field(
        "wait",
        description="a night that finds a canary running: wait (skip the night, train "
        "nothing) or replace (train, and the new candidate replaces the running canary)",
    )

    @model_validator(mode="after")
    def _votes(self) -> CanaryConfig:
        if self.max_votes < self.min_votes:
            raise ValueError(f"max_votes ({self.max_votes}) is below min_votes ({self.min_votes})")
        return self

    def rules(self) -> CanaryRules:
        """The verdict's rules."""
        return CanaryRules(
            alpha=self.alpha,
            min_effect=self.min_effect,
            min_votes=self.min_votes,
            max_votes=self.max_votes,
            max_hours=self.max_hours,
        )


class Settings(BaseSettings):
    """The whole configuration of kto-loop."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    feedback_http: FeedbackHttpConfig = Field(default_factory=FeedbackHttpConfig)
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    balance: BalanceOptions = Field(default_factory=BalanceOptions)
    train: TrainOptions = Field(default_factory=TrainOptions)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    cycle: CycleConfig = Field(default_factory=CycleConfig)
    gate: GateOptions = Field(default_factory=GateOptions)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)

    @field_validator("train", mode="before")
    @classmethod
    def _no_run_controls(cls, value: Any) -> Any:
        # TrainOptions is the [train] section, less the fields that steer a single run.
        named = [n for n in RUN_CONTROLS if isinstance(value, Mapping) and n in value]
        if named:
            raise ValueError(
                f"{', '.join(named)} is not a configuration key: it steers a single run and "
                "is set in code; remove it from [train]"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = init_settings.init_kwargs.pop("_toml_file", None)  # type: ignore[attr-defined]
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


class ConfigError(ValueError):
    """The configuration is unusable; the message names each bad key and the fix."""


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (or $KTO_LOOP_CONFIG, or nothing), apply environment overrides,
    validate, and return the settings.

    Raises:
        ConfigError: naming the file, each bad key as [section] key, and what is wrong.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    where = "defaults and environment"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config PATH")
        try:
            with path.open("rb") as f:
                tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    misspelled = _unknown_environment_keys(os.environ)
    if misspelled:
        raise ConfigError("\n".join(["invalid configuration (environment):", *misspelled]))
    try:
        return Settings(_toml_file=path, **overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where)) from None


def _section_keys(section: str) -> list[str]:
    """The keys a section takes: its model's fields, or its options dataclass's."""
    field = Settings.model_fields.get(section)
    kind = field.annotation if field is not None else None
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        names = [f.name for f in dataclasses.fields(kind)]
    else:
        names = list(getattr(kind, "model_fields", {}))
    return [n for n in names if not (section == "train" and n in RUN_CONTROLS)]


def _environment_keys() -> list[str]:
    return [
        f"{ENV_PREFIX}{section}__{key}".upper()
        for section in Settings.model_fields
        for key in _section_keys(section)
    ]


def _unknown_environment_keys(environ: Mapping[str, str]) -> list[str]:
    """Variables shaped like config overrides (KTO_LOOP_<SECTION>__<KEY>) that name no
    key: pydantic-settings would ignore them, and a misspelled secret would go unset."""
    known = _environment_keys()
    lines = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or "__" not in upper:
            continue
        if any(upper == k or upper.startswith(k + "__") for k in known):
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "no such section or key"
        lines.append(f"  environment variable {name} names no configuration key; {hint}")
    return lines


def _describe(exc: ValidationError, where: str) -> str:
    lines = [f"invalid configuration ({where}):"]
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if len(loc) == 1 and loc[0] in Settings.model_fields:
            # A rule across a section's keys: its message names them, and the section's
            # values, which may hold a secret, are not echoed.
            lines.append(f"  [{loc[0]}]: {err['msg']}")
            continue
        key = f"[{loc[0]}] {'.'.join(loc[1:])}" if len(loc) > 1 else loc[0] if loc else "?"
        message = err["msg"]
        # Unknown keys: extra_forbidden in a model, unexpected_keyword_argument in a dataclass.
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown key" + _suggest(loc)
        elif "input" in err and err["type"] not in ("missing",) and not _secret(loc):
            message += f" (got {err['input']!r})"
        env = ENV_PREFIX + "__".join(loc).upper()
        lines.append(f"  {key}: {message}  [env {env}]")
    return "\n".join(lines)


def _secret(loc: list[str]) -> bool:
    return any(word in loc[-1] for word in ("password", "key", "secret")) if loc else False


def _suggest(loc: list[str]) -> str:
    known = list(Settings.model_fields) if len(loc) == 1 else _section_keys(loc[0])
    close = difflib.get_close_matches(loc[-1], known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
