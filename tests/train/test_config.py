"""TrainConfig: YAML and --set map onto it 1:1; unknown keys suggest the closest valid one; bad values fail early."""

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig, apply_overrides, config_from_dict, load_config, parse_override


def write_yaml(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


def cli_error(argv: list[str], capsys) -> str:
    """Run `lorakit ...`, expect exit 2 and exactly one `lorakit: error:` line on stderr; return it."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def test_yaml_maps_onto_the_dataclass(tmp_path):
    data = {"model": "m", "quantize": None, "train_file": "t.jsonl", "batch_size": 2, "max_steps": 7,
            "learning_rate": 3e-4, "lr_scheduler": "linear", "lora": {"r": 4, "lora_alpha": 8}}
    cfg = load_config(write_yaml(tmp_path / "run.yaml", data))
    assert (cfg.model, cfg.quantize, cfg.batch_size, cfg.max_steps, cfg.learning_rate, cfg.lr_scheduler) == \
        ("m", None, 2, 7, 3e-4, "linear")
    assert cfg.lora_config().r == 4 and cfg.lora_config().lora_alpha == 8
    assert load_config(write_yaml(tmp_path / "again.yaml", cfg.to_dict())) == cfg  # config.yaml round-trips


def test_set_overrides_top_level_and_lora_keys(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "run.yaml", {"batch_size": 2, "lora": {"r": 16, "lora_alpha": 32}}),
                      ["lora.r=4", "batch_size=3", "packing=true", "learning_rate=1e-4", "quantize=none"])
    assert cfg.lora["r"] == 4 and cfg.lora["lora_alpha"] == 32 and cfg.lora_config().r == 4
    assert cfg.batch_size == 3 and cfg.packing is True and cfg.quantize is None
    # PyYAML reads 1e-4 as a string; it must still be the number.
    assert cfg.learning_rate == 1e-4 and isinstance(cfg.learning_rate, float)


def test_set_lora_on_defaults_keeps_the_other_lora_defaults():
    cfg = load_config(None, ["lora.r=4"])
    assert cfg.lora == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def test_parse_override_reads_values_as_yaml():
    assert parse_override("lora.target_modules=[q_proj, v_proj]") == (["lora", "target_modules"],
                                                                      ["q_proj", "v_proj"])
    assert parse_override("val_file=") == (["val_file"], "")
    assert parse_override("model=a=b") == (["model"], "a=b")
    with pytest.raises(LorakitError, match="expected key=value"):
        parse_override("learning_rate")


@pytest.mark.parametrize("data, message", [
    ({"learnin_rate": 1e-4}, "unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
    ({"batchsize": 4}, "did you mean 'batch_size'?"),
    ({"lora": {"rr": 4}}, "lora: unknown option 'rr'; did you mean 'r'?"),
])
def test_unknown_yaml_key_suggests_the_closest(data, message):
    with pytest.raises(LorakitError, match=message.replace("?", r"\?")):
        config_from_dict(data, where="run.yaml")


@pytest.mark.parametrize("override, message", [
    ("learnin_rate=1e-4", "unknown key 'learnin_rate'; did you mean 'learning_rate'?"),
    ("lora.lora_alph=4", "unknown lora key 'lora_alph'; did you mean 'lora_alpha'?"),
    ("lora.rank=4", "unknown lora key 'rank'; valid keys: r, lora_alpha"),
    ("optimizer.lr=1", "only lora.<key>, vera.<key> and adalora.<key> may be nested"),
])
def test_unknown_set_key_suggests_the_closest(override, message):
    with pytest.raises(LorakitError, match=message.replace("?", r"\?")):
        apply_overrides({}, [override])


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("gradient_accumulation_steps", 1.5, "gradient_accumulation_steps must be an integer >= 1"),
    ("optimizer", "sgd", "optimizer must be one of ['adamw', 'adamw8bit', 'paged_adamw8bit'], got 'sgd'"),
    ("lr_scheduler", "step", "lr_scheduler must be one of"),
    ("quantize", "int8", "quantize must be one of ['nf4', 'fp4'] or null, got 'int8'"),
    ("learning_rate", 0, "learning_rate must be > 0"),
    ("learning_rate", "fast", "learning_rate must be a number, got 'fast'"),
    ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1)"),
    ("val_fraction", -0.1, "val_fraction must be in [0, 1)"),
    ("max_steps", -1, "max_steps must be an integer >= 0"),
    ("bf16", "maybe", "bf16 must be true or false, got 'maybe'"),
    ("lora", [4], "lora must be a mapping"),
])
def test_invalid_values_are_clear_errors(field, value, message):
    with pytest.raises(LorakitError) as info:
        TrainConfig(**{field: value})
    assert message in str(info.value)


def test_train_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = load_config(write_yaml(tmp_path / "run.yaml", {"train_file": "data.jsonl"}))
    assert cfg.train_file == str(tmp_path / "data.jsonl")


# ------------------------------------------------------------------------------------------- via the CLI

def test_cli_unknown_yaml_key_exits_2_with_suggestion(tmp_path, capsys):
    config = write_yaml(tmp_path / "run.yaml", {"learnin_rate": 1e-4})
    line = cli_error(["train", str(config)], capsys)
    assert line == f"lorakit: error: {config}: unknown key 'learnin_rate'; did you mean 'learning_rate'?"


@pytest.mark.parametrize("override, says", [
    ("learnin_rate=1e-4", "did you mean 'learning_rate'?"),
    ("lora.alpha=8", "did you mean 'lora_alpha'?"),
    ("batch_size=0", "batch_size must be an integer >= 1, got 0"),
    ("optimizer=sgd", "optimizer must be one of"),
])
def test_cli_bad_set_exits_2_with_one_line(override, says, capsys):
    assert says in cli_error(["train", "--set", override], capsys)


@pytest.mark.parametrize("content, says", [
    ("a: [1, 2", "not valid YAML"),
    ("- just\n- a list\n", "expected a mapping of settings"),
])
def test_cli_broken_yaml_exits_2(tmp_path, content, says, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    assert says in cli_error(["train", str(config)], capsys)


def test_cli_missing_config_and_missing_train_file(tmp_path, capsys):
    assert "no such config file" in cli_error(["train", str(tmp_path / "nope.yaml")], capsys)
    assert "train_file is not set" in cli_error(["train", "--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()
