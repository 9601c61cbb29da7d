from pathlib import Path

import pytest
import yaml

from unmask_cli.config import Config, PrepareConfig, load_config
from unmask_cli.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_matches_seed_hyperparameters():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.data.image_size == 256 and cfg.prepare.size == 256
    assert cfg.train.batch_size == 16 and cfg.train.epochs == 100
    assert cfg.train.lr_g == 1e-4 and cfg.train.lr_d == 1e-4
    assert (cfg.train.beta1, cfg.train.beta2) == (0.5, 0.999)
    assert cfg.loss.lambda_rc == 100 and cfg.loss.lambda_perc == 1
    assert cfg.loss.lambda_adv_whole == 1 and cfg.loss.lambda_adv_mask == 1
    assert cfg.prepare.num_samples is None and PrepareConfig(source='celeba').samples() == 10000
    # the YAML spells out every key, and equals the built-in defaults
    assert cfg.to_dict() == Config().to_dict()
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert {k: set(v) for k, v in raw.items()} == {k: set(v) for k, v in Config().to_dict().items()}


def test_quick_yaml_is_cpu_sized():
    cfg = load_config(REPO / "configs" / "quick.yaml")
    assert 64 <= cfg.data.image_size <= 128
    assert cfg.model.ngf <= 32


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.epoch" in message and str(path) in message and "epochs" in message
    assert "\n" not in message and info.value.exit_code == 2


def test_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: sixteen\n")
    with pytest.raises(ConfigError, match=r"train.batch_size must be int"):
        load_config(path)
    path.write_text("train:\n  amp: 1\n")
    with pytest.raises(ConfigError, match="train.amp must be bool"):
        load_config(path)
    path.write_text("loss:\n  vgg_layers: [3, x]\n")
    with pytest.raises(ConfigError, match=r"loss.vgg_layers\[1\]"):
        load_config(path)


def test_section_must_be_mapping_and_yaml_must_parse(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(path)
    path.write_text("train: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides(tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml", ["train.epochs=3", "loss.vgg_weights=random", "model.ngf=16"])
    assert cfg.train.epochs == 3 and cfg.loss.vgg_weights == "random" and cfg.model.ngf == 16
    assert load_config(None, ["train.lr_g=2e-4"]).train.lr_g == 2e-4
    with pytest.raises(ConfigError, match="--set train.epochz=3"):
        load_config(None, ["train.epochz=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="power of two"):
        load_config(None, ["data.image_size=100"])
    with pytest.raises(ConfigError, match="loss.warmup_steps must be >= 0"):
        load_config(None, ["loss.warmup_steps=-1"])
    for bad in ("1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match=r"train.ema_decay must be in \[0, 1\)"):
            load_config(None, [f"train.ema_decay={bad}"])
    assert load_config(None, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    with pytest.raises(ConfigError, match="train.ema_start must be >= 0"):
        load_config(None, ["train.ema_start=-1"])


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
