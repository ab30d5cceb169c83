"""Settings: defaults < YAML file < VISIONLOOP_* env < flags, and one ConfigError naming the bad key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionloop.config import Settings, ValidationPolicy, default_of, describe, load_settings
from visionloop.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No VISIONLOOP_* / MLFLOW_TRACKING_URI from the outside, no ./visionloop.yaml from the cwd."""
    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults():
    settings = load_settings()
    assert settings.home == Path(".visionloop")
    assert settings.data.source == "digits"
    assert (settings.data.image_size, settings.data.channels) == (0, 0)
    assert (settings.data.val_fraction, settings.data.test_fraction) == (0.1, 0.2)
    assert settings.train.epochs == 30
    assert settings.train.batch_size == 64
    assert settings.train.device == "auto"
    assert settings.validation == ValidationPolicy()
    assert settings.gate.min_accuracy == 0.9
    assert settings.registry.model_name == "visionloop-classifier"
    assert load_settings(overrides={}) == settings


def test_env_var_overrides_the_default(monkeypatch):
    monkeypatch.setenv("VISIONLOOP_TRAIN__EPOCHS", "5")
    monkeypatch.setenv("VISIONLOOP_DATA__SOURCE", "synthetic")
    settings = load_settings()
    assert settings.train.epochs == 5
    assert settings.train.batch_size == 64  # the rest of the group keeps its defaults
    assert settings.data.source == "synthetic"


def test_yaml_file_overrides_the_default(tmp_path):
    config = write_yaml(
        tmp_path / "settings.yaml", "train:\n  epochs: 7\n  batch_size: 16\ndata:\n  source: synthetic\n"
    )
    settings = load_settings(config_file=config)
    assert settings.train.epochs == 7
    assert settings.train.batch_size == 16
    assert settings.train.lr == 3e-3
    assert settings.data.source == "synthetic"


def test_env_beats_file_and_flags_beat_env(tmp_path, monkeypatch):
    config = write_yaml(tmp_path / "settings.yaml", "train:\n  epochs: 7\n  batch_size: 16\n  seed: 3\n")
    monkeypatch.setenv("VISIONLOOP_TRAIN__EPOCHS", "5")
    monkeypatch.setenv("VISIONLOOP_TRAIN__SEED", "4")
    from_env = load_settings(config_file=config)
    assert (from_env.train.epochs, from_env.train.batch_size, from_env.train.seed) == (5, 16, 4)
    flagged = load_settings(config_file=config, overrides={"train.epochs": 3, "train.lr": 0.01, "train.seed": None})
    assert flagged.train.epochs == 3  # flag over env over file
    assert flagged.train.lr == 0.01  # flag over default
    assert flagged.train.batch_size == 16  # file value kept beside the flags
    assert flagged.train.seed == 4  # an unset (None) flag does not hide the env value


def test_top_level_flag_and_nested_flags_together(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path / "h"), "gate.min_accuracy": 0.5, "data.channels": 3})
    assert settings.home == tmp_path / "h"
    assert settings.gate.min_accuracy == 0.5
    assert settings.data.channels == 3


def test_config_file_from_env_and_from_cwd(tmp_path, monkeypatch):
    write_yaml(tmp_path / "visionloop.yaml", "train:\n  epochs: 11\n")  # tmp_path is the cwd
    assert load_settings().train.epochs == 11
    other = write_yaml(tmp_path / "other.yaml", "train:\n  epochs: 12\n")
    monkeypatch.setenv("VISIONLOOP_CONFIG", str(other))
    assert load_settings().train.epochs == 12
    explicit = write_yaml(tmp_path / "explicit.yaml", "train:\n  epochs: 13\n")
    assert load_settings(config_file=explicit).train.epochs == 13


def test_file_is_read_per_call_only(tmp_path):
    config = write_yaml(tmp_path / "settings.yaml", "train:\n  epochs: 7\n")
    assert load_settings(config_file=config).train.epochs == 7
    assert load_settings().train.epochs == 30
    assert Settings().train.epochs == 30


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.epochs": -1}, "train.epochs"),
        ({"train.epochs": 0}, "train.epochs"),
        ({"data.channels": 2}, "data.channels"),
        ({"data.val_fraction": 0.4, "data.test_fraction": 0.4}, "data.val_fraction + data.test_fraction"),
        ({"registry.model_name": "team/model"}, "registry.model_name"),
        ({"registry.model_name": "has space"}, "registry.model_name"),
        ({"train.device": "tpu"}, "train.device"),
        ({"validation.max_bad_fraction": 1.5}, "validation.max_bad_fraction"),
    ],
)
def test_invalid_flag_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="invalid setting") as info:
        load_settings(overrides=overrides)
    assert key in str(info.value)


def test_fractions_just_under_the_limit_are_fine():
    settings = load_settings(overrides={"data.val_fraction": 0.3, "data.test_fraction": 0.49})
    assert settings.data.val_fraction + settings.data.test_fraction < 0.8


def test_invalid_env_value_names_the_key(monkeypatch):
    monkeypatch.setenv("VISIONLOOP_TRAIN__EPOCHS", "-3")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_settings()
    monkeypatch.setenv("VISIONLOOP_TRAIN__EPOCHS", "many")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_settings()


def test_invalid_file_value_names_the_key(tmp_path):
    config = write_yaml(tmp_path / "bad.yaml", "data:\n  channels: 2\n")
    with pytest.raises(ConfigError, match=r"data\.channels"):
        load_settings(config_file=config)


@pytest.mark.parametrize(
    ("where", "key"),
    [("file", "train.epoch"), ("file", "trian"), ("flag", "train.epoch"), ("flag", "validation.max_pixel")],
)
def test_misspelt_keys_are_errors_not_ignored(tmp_path, where, key):
    if where == "file":
        *group, leaf = key.split(".")
        text = f"{group[0]}:\n  {leaf}: 5\n" if group else f"{leaf}:\n  epochs: 5\n"
        kwargs = {"config_file": write_yaml(tmp_path / "typo.yaml", text)}
    else:
        kwargs = {"overrides": {key: 5}}
    with pytest.raises(ConfigError, match="invalid setting") as info:
        load_settings(**kwargs)
    assert key in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_settings(config_file=tmp_path / "absent.yaml")
    assert "absent.yaml" in str(info.value)


def test_missing_config_file_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VISIONLOOP_CONFIG", str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings()


def test_yaml_syntax_error(tmp_path):
    config = write_yaml(tmp_path / "broken.yaml", "train:\n  epochs: [5\n")
    with pytest.raises(ConfigError, match="could not read settings"):
        load_settings(config_file=config)


def test_tracking_uri_falls_back_to_sqlite_under_home(tmp_path, monkeypatch):
    settings = load_settings(overrides={"home": str(tmp_path / "proj")})
    assert settings.tracking_uri == f"sqlite:///{(tmp_path / 'proj' / 'mlflow.db').resolve()}"
    assert settings.artifact_root == (tmp_path / "proj" / "mlartifacts").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert settings.tracking_uri == "http://127.0.0.1:5000"
    explicit = load_settings(overrides={"registry.tracking_uri": "sqlite:////srv/mlflow.db"})
    assert explicit.tracking_uri == "sqlite:////srv/mlflow.db"  # the setting beats the MLflow env var


def test_relative_home_resolves_against_the_cwd(tmp_path):
    assert load_settings().tracking_uri == f"sqlite:///{tmp_path.resolve() / '.visionloop' / 'mlflow.db'}"


def test_default_of_and_describe():
    assert default_of("train.epochs") == 30
    assert default_of("data.source") == "digits"
    assert default_of("home") == Path(".visionloop")
    assert default_of("validation.max_pixels") == 40_000_000
    text = describe("train.epochs")
    assert "Maximum training epochs." in text
    assert "setting train.epochs" in text
    assert "env VISIONLOOP_TRAIN__EPOCHS" in text
    assert "default 30" in text
    assert "env VISIONLOOP_HOME" in describe("home")


def test_every_setting_has_a_description():
    for group_name, group in Settings.model_fields.items():
        annotation = group.annotation
        fields = annotation.model_fields if isinstance(annotation, type) and hasattr(annotation, "model_fields") else {}
        for name in fields:
            assert describe(f"{group_name}.{name}").split(" [")[0] not in ("", "None"), f"{group_name}.{name}"


def test_serve_defaults_and_limits():
    serve = load_settings().serve
    assert (serve.host, serve.port, serve.model_ref) == ("127.0.0.1", 8000, "champion")
    assert (serve.max_batch_size, serve.max_wait_ms) == (32, 2.0)
    assert serve.admin_token == "" and serve.log_predictions is True
    # Pillow refuses images over its own limit whatever we allow, so a higher setting would be a lie
    with pytest.raises(ConfigError, match=r"serve\.max_pixels"):
        load_settings(overrides={"serve.max_pixels": 100_000_000})
    with pytest.raises(ConfigError, match=r"serve\.max_batch_size"):
        load_settings(overrides={"serve.max_batch_size": 0})


def test_serve_admin_token_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("VISIONLOOP_SERVE__ADMIN_TOKEN", "s3cret")
    assert load_settings().serve.admin_token == "s3cret"


def test_settings_and_load_settings_read_the_same_file(tmp_path, monkeypatch):
    # every entry point (a stage command, a KFP component, a torchrun worker) resolves settings alike
    for name in [n for n in os.environ if n.startswith("VISIONLOOP_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "visionloop.yaml").write_text("train:\n  epochs: 7\n")
    assert Settings().train.epochs == load_settings().train.epochs == 7
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  epochs: 9\n")
    monkeypatch.setenv("VISIONLOOP_CONFIG", str(other))
    assert Settings().train.epochs == load_settings().train.epochs == 9
    assert load_settings(tmp_path / "visionloop.yaml").train.epochs == 7  # --config wins
    assert Settings().train.epochs == 9  # and only for that call
