"""Configuration: a TOML file plus environment overrides, errors that name the key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from connectors.config import ConfigError, load_settings
from pipeline.feedback.events import RatingPolicy
from pipeline.feedback.snapshot import SnapshotOptions
from pipeline.promotion.gate import GateOptions
from pipeline.training.options import LoraOptions, TrainOptions

SECRET = "3a7bd3e2360a3d29eea436fcfb7e44c7"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kto-loop.toml"
    path.write_text(text)
    return path


def test_file_values_and_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, '[kafka]\ntopic = "fb"\n[ingest]\nbatch_max_events = 10\n'))
    assert (s.kafka.topic, s.kafka.dead_letter_topic) == ("fb", "fb.dlq")
    assert s.ingest.batch_max_events == 10
    assert s.ingest.batch_max_seconds == 5.0


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[kafka]\ntopic = "fb"\ngroup_id = "from-file"\n')
    monkeypatch.setenv("KTO_LOOP_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("KTO_LOOP_KAFKA__BOOTSTRAP_SERVERS", '["k1:9092", "k2:9092"]')
    monkeypatch.setenv("KTO_LOOP_EVENTS__USER_HASH_KEY", SECRET)
    s = load_settings(path)
    assert s.kafka.topic == "from-env"
    assert s.kafka.group_id == "from-file"
    assert s.kafka.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert s.events.user_hash_key.get_secret_value() == SECRET
    assert SECRET not in repr(s)


def test_errors_name_every_bad_key_and_its_env_variable(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[kafka]\nbootstrap_server = ["a:1"]\n[ingest]\nbatch_max_events = -1\n[stroe]\nurl = "x"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert str(path) in text
    assert "[kafka] bootstrap_server: unknown key; did you mean 'bootstrap_servers'?" in text
    assert "[ingest] batch_max_events: Input should be greater than or equal to 1 (got -1)" in text
    assert "KTO_LOOP_INGEST__BATCH_MAX_EVENTS" in text
    assert "stroe: unknown key; did you mean 'store'?" in text


def test_bad_environment_value_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTO_LOOP_INGEST__BATCH_MAX_SECONDS", "soon")
    with pytest.raises(ConfigError, match=r"\[ingest\] batch_max_seconds: .*'soon'"):
        load_settings(write(tmp_path, ""))


def test_secrets_are_not_echoed_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, '[kafka]\nsasl_plain_password = ["hunter2"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "sasl_plain_password" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_cross_field_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="heartbeat_interval_ms must be at most a third"):
        load_settings(
            write(tmp_path, "[kafka]\nsession_timeout_ms = 3000\nheartbeat_interval_ms = 2000\n")
        )
    with pytest.raises(ConfigError, match="needs sasl_mechanism"):
        load_settings(write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\n'))
    monkeypatch.setenv("KTO_LOOP_EVENTS__USER_HASH_KEY", SECRET)
    with pytest.raises(
        ConfigError, match=r"\[events\]: .*rating_undesirable_max must be below"
    ) as err:
        load_settings(
            write(tmp_path, "[events]\nrating_desirable_min = 3\nrating_undesirable_max = 3\n")
        )
    assert SECRET not in str(err.value)  # the section's values are not echoed


def test_security_settings_pass_through_to_kafka_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\n'
        'sasl_plain_username = "svc"\nssl_cafile = "/etc/ca.pem"\n'
        "client_options = { request_timeout_ms = 45000 }\n",
    )
    monkeypatch.setenv("KTO_LOOP_KAFKA__SASL_PLAIN_PASSWORD", "pw")
    kwargs = load_settings(path).kafka.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("svc", "pw")
    assert kwargs["ssl_cafile"] == "/etc/ca.pem"
    assert kwargs["request_timeout_ms"] == 45000


def test_missing_or_broken_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[kafka\n"))


def test_the_example_config_in_deploy_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / "deploy/kto-loop.example.toml"
    monkeypatch.setenv("KTO_LOOP_KAFKA__SASL_PLAIN_PASSWORD", "pw")
    s = load_settings(example)
    assert s.kafka.security_protocol == "SASL_SSL"
    assert s.store.url.startswith("s3://")
    assert s.gate == GateOptions(max_drift=1.0, drift_prompts=16, generation_prompts=16)


def test_the_local_config_in_deploy_is_valid() -> None:
    local = Path(__file__).resolve().parent.parent / "deploy/kto-loop.local.toml"
    s = load_settings(local)
    assert s.serving.base_model == "/models/my-model" and s.gate == GateOptions()


@pytest.mark.parametrize(
    "key", ["", "abc", "mysecret", "0" * 64, "ab" * 32, SECRET[:31], "g" + SECRET]
)
def test_a_weak_user_hash_key_is_refused_and_the_error_says_how_to_make_one(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KTO_LOOP_EVENTS__USER_HASH_KEY", key)
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    text = str(err.value)
    assert "[events] user_hash_key" in text and "openssl rand -hex 32" in text
    assert not key or key not in text  # the key itself is never echoed


def test_a_misspelled_environment_variable_gets_a_did_you_mean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KTO_LOOP_EVENT__USER_HASH_KEY", SECRET)
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    text = str(err.value)
    assert "KTO_LOOP_EVENT__USER_HASH_KEY" in text
    assert "did you mean KTO_LOOP_EVENTS__USER_HASH_KEY?" in text
    assert SECRET not in text
    monkeypatch.delenv("KTO_LOOP_EVENT__USER_HASH_KEY")
    monkeypatch.setenv("KTO_LOOP_GIT_COMMIT", "abc")  # not shaped like a config key
    monkeypatch.setenv("KTO_LOOP_STORE__STORAGE_OPTIONS__ANON", "true")  # nested: known
    load_settings(None)


def test_train_lora_and_gate_sections_are_the_pipeline_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings(None).train == TrainOptions()
    assert load_settings(None).gate == GateOptions()
    path = write(
        tmp_path,
        '[train]\nmax_steps = 5\nselection = "final"\n[lora]\ntarget_modules = ["q"]\n'
        '[gate]\njudge = "likelihood"\nscorer = "tests.scorers:constant"\n',
    )
    monkeypatch.setenv("KTO_LOOP_GATE__MIN_HELDOUT", "20")
    s = load_settings(path)
    assert s.train == TrainOptions(max_steps=5, selection="final")
    assert s.lora == LoraOptions(target_modules=("q",))
    assert s.gate == GateOptions(
        judge="likelihood", scorer="tests.scorers:constant", min_heldout=20
    )


def test_snapshot_and_events_sections_are_the_pipeline_options_plus_io_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = load_settings(None)
    assert defaults.snapshot.as_dict() == SnapshotOptions().as_dict()
    assert defaults.snapshot.out_dir == "./data/snapshots"
    assert [defaults.events.label(r) for r in range(1, 6)] == [
        RatingPolicy().label(r) for r in range(1, 6)
    ]
    path = write(
        tmp_path,
        '[snapshot]\nsplit_seed = "s"\nout_dir = "snaps"\n[events]\nrating_desirable_min = 5\n',
    )
    monkeypatch.setenv("KTO_LOOP_SNAPSHOT__TIE_POLICY", "desirable")
    monkeypatch.setenv("KTO_LOOP_EVENTS__RATING_UNDESIRABLE_MAX", "3")
    monkeypatch.setenv("KTO_LOOP_EVENTS__USER_HASH_KEY", SECRET)
    s = load_settings(path)
    assert isinstance(s.snapshot, SnapshotOptions) and isinstance(s.events, RatingPolicy)
    assert s.snapshot.as_dict() == SnapshotOptions(split_seed="s", tie_policy="desirable").as_dict()
    assert s.snapshot.out_dir == "snaps"
    assert [s.events.label(r) for r in range(1, 6)] == [False, False, False, None, True]
    assert s.events.user_hash_key.get_secret_value() == SECRET
    assert SECRET not in repr(s.events)


def test_pipeline_option_sections_errors_name_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[train]\nmax_step = 3\nlr_schedule = "cos"\n[lora]\nr = 4\n'
        '[gate]\nmax_kll = 3\nscorer = "politeness"\nmin_accuracy_gain = -0.1\n'
        '[snapshot]\nheldout_fraction = 1\nsplit_seed = ""\nout_dri = "x"\n'
        "[events]\nrating_desirable_min = 6\nrating_undesirable = 1\n",
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert "[train] max_step: unknown key; did you mean 'max_steps'?" in text
    assert "[train] lr_schedule: Input should be 'cosine', 'linear' or 'constant'" in text
    assert "[lora] r: Input should be 1, 8, 16" in text and "KTO_LOOP_LORA__R" in text
    assert "[gate] max_kll: unknown key; did you mean 'max_kl'?" in text
    assert '[gate] scorer: Value error, scorer must be "module:function"' in text
    assert "a loss cannot be tolerated" in text and "KTO_LOOP_GATE__MIN_ACCURACY_GAIN" in text
    assert "[snapshot] heldout_fraction: Input should be less than 1 (got 1)" in text
    assert "[snapshot] split_seed: String should have at least 1 character" in text
    assert "[snapshot] out_dri: unknown key; did you mean 'out_dir'?" in text
    assert "[events] rating_desirable_min: Input should be less than or equal to 5" in text
    assert (
        "[events] rating_undesirable: unknown key; did you mean 'rating_undesirable_max'?" in text
    )
    with pytest.raises(ConfigError, match="leaves no room for a completion"):
        load_settings(write(tmp_path, "[train]\nmax_length = 64\nmax_prompt_length = 64\n"))


def test_a_run_control_is_not_a_configuration_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="stop_after_steps is not a configuration key"):
        load_settings(write(tmp_path, "[train]\nstop_after_steps = 3\n"))
    monkeypatch.setenv("KTO_LOOP_TRAIN__STOP_AFTER_STEPS", "3")
    with pytest.raises(ConfigError, match="KTO_LOOP_TRAIN__STOP_AFTER_STEPS names no"):
        load_settings(None)


def test_options_are_validated_whenever_built() -> None:
    options = TrainOptions(max_steps=7)
    assert options.overridden(max_steps=None, seed=3) == replace(options, seed=3)
    for bad in ({"batch_size": 0}, {"selection": "best"}, {"max_steps_": 1}):
        with pytest.raises(ValidationError):
            options.overridden(**bad)
    with pytest.raises(ValidationError, match="leaves no room for a completion"):
        replace(options, max_length=16, max_prompt_length=16)
    with pytest.raises(ValidationError):
        LoraOptions(target_modules=())
