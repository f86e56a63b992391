"""Typed config: the shipped YAML validates, overrides apply, mistakes name the key and the file."""

from pathlib import Path

import pytest
import yaml

from dogbreed.config import ConfigError, ScanConfig, dump_config, load_config
from dogbreed.train.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cls", [("scan", ScanConfig), ("train", TrainConfig)])
def test_shipped_yaml_writes_out_every_key_at_every_depth_with_the_typed_default(name, cls):
    # The typed defaults are the one source; configs/<job>.yaml documents every knob with exactly that value.
    written = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text(encoding="utf-8"))
    assert written == cls().model_dump(mode="json")
    assert load_config(cls, ROOT / "configs" / f"{name}.yaml") == cls()


def test_training_opens_photos_as_the_scan_does_and_has_only_keys_it_uses():
    assert TrainConfig().photos == ScanConfig().photos
    assert set(TrainConfig.model_fields["decode"].annotation.model_fields) == {"batch_size", "num_cpus", "max_retries"}


@pytest.mark.parametrize("old, new", [("decode:\n  max_pixels: 5\n", "photos.max_pixels"),
                                      ("face:\n  max_side: 320\n", "photos.face_side")])
def test_a_key_that_moved_says_where_it_went(tmp_path, old, new):
    f = tmp_path / "old.yaml"
    f.write_text(old)
    with pytest.raises(ConfigError, match=f"is now '{new}'"):
        load_config(ScanConfig, f)


def test_a_config_that_is_not_utf8_is_one_sentence(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("top_k: 3  # café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text"):
        load_config(ScanConfig, f)


def test_overrides_win_and_none_means_not_given():
    cfg = load_config(ScanConfig, ROOT / "configs" / "scan.yaml",
                      {"out": "/x", "model": None, "inference.batch_size": 7, "face.min_neighbors": 3})
    assert (cfg.out, cfg.model, cfg.inference.batch_size, cfg.face.min_neighbors) == ("/x", "default", 7, 3)


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("decode:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'decode\.batchsize'"):
        load_config(ScanConfig, f)


def test_wrong_type_names_key_and_value(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("top_k: lots\n")
    with pytest.raises(ConfigError, match=r"key 'top_k'.*'lots'"):
        load_config(ScanConfig, f)


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "top level must be a mapping"), ("a: [\n", "not valid YAML"),
                                           ("roots: " + "[" * 900 + "]" * 900 + "\n", "nested too deeply")])
def test_malformed_files(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(ScanConfig, f)


@pytest.mark.parametrize("key, value", [
    ("lock_lease_s", float("inf")), ("photos.timeout_s", float("inf")),  # tracebacks: the clock overflowed
    ("vacuum_retention_hours", 10**20), ("photos.max_memory_mb", 10**20),  # tracebacks: too big for the callee
    ("inference.num_gpus", -1),  # a traceback from Ray
])
def test_values_no_run_can_use_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'") as e:
        load_config(ScanConfig, None, {key: value})
    assert "\n" not in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(ScanConfig, tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path):
    cfg = ScanConfig(roots=["/a"], out="/o", dog_threshold=0.4)
    f = tmp_path / "r.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(ScanConfig, f) == cfg


def test_unknown_face_detector_is_one_sentence_naming_the_key(tmp_path):
    f = tmp_path / "faces.yaml"
    f.write_text("face:\n  detector: mtcnn\n")
    with pytest.raises(ConfigError) as e:
        load_config(ScanConfig, f)
    assert str(e.value).startswith(f"{f}: key 'face.detector'") and "'mtcnn'" in str(e.value)
    assert "\n" not in str(e.value) and "yunet" in str(e.value) and "haar" in str(e.value)


@pytest.mark.timeout(60)  # the sentence's repr of the expanded aliases ran for minutes, gigabytes deep
def test_a_yaml_alias_bomb_or_a_5000_digit_number_is_one_short_sentence(tmp_path):
    levels = ["&a0 [" + ",".join(["x"] * 10) + "]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "lol.yaml"
    bomb.write_text(f"top_k: [{', '.join(levels)}]\n")  # 10^9 'x' once expanded; 300-odd bytes of YAML
    with pytest.raises(ConfigError) as e:
        load_config(ScanConfig, bomb)
    assert str(e.value).startswith(f"{bomb}: key 'top_k': Input should be a valid integer (got [") and len(str(e.value)) < 400
    big = tmp_path / "big.yaml"
    big.write_text(f"top_k: {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=r"not a usable YAML value: Exceeds the limit \(4300 digits\)"):
        load_config(ScanConfig, big)


def test_a_path_that_begins_with_a_tilde_is_the_users_home_as_a_shell_would_make_it(tmp_path, monkeypatch):
    """`log_file: ~/dogbreed.log` in a YAML (or `--out=~/x`, which bash leaves alone) made a folder named `~` under
    the current one; a tilde anywhere else, and URIs, stay as given."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "scan.yaml").write_text("roots: [~/photos, s3://b/~x, a~b]\nout: ~/out\nlog_file: ~/scan.log\n"
                                        "model: ~/models/m\nphotos: {plugins: [~/p.py, mod]}\n", encoding="utf-8")
    cfg = load_config(ScanConfig, tmp_path / "scan.yaml")
    assert cfg.roots == [str(tmp_path / "photos"), "s3://b/~x", "a~b"]
    assert (cfg.out, cfg.log_file, cfg.model) == (str(tmp_path / "out"), str(tmp_path / "scan.log"), str(tmp_path / "models/m"))
    assert cfg.photos.plugins == [str(tmp_path / "p.py"), "mod"]
    train = load_train_config(None, {"data": "~/d", "out": "~/m", "classes": "~/c.txt", "val_data": "v"})
    assert (train.data, train.out, train.classes, train.val_data) == (str(tmp_path / "d"), str(tmp_path / "m"),
                                                                      str(tmp_path / "c.txt"), "v")
