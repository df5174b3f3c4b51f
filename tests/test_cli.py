"""The `lorakit` command in-process: help, train's error paths and overwrite guard, generate, merge."""

import json

import pytest
import torch
import yaml
from helpers import build_tiny_model_folder, tiny_train_config

from lorakit.cli import build_parser, main
from lorakit.config import LoraConfig
from lorakit.inject import add_adapter
from lorakit.models import load_model
from lorakit.peft_format import load_adapter, save_adapter
from lorakit.train.demo_task import make_examples, write_jsonl

PROMPT = "hi"


def one_error_line(err: str) -> str:
    """The single stderr line of a CLI error (and proof there is nothing else: no traceback, no bar)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_cli")
    model_dir = build_tiny_model_folder(root / "model")
    adapters = {}
    for name, seed in (("a", 1), ("b", 2)):
        model, _ = load_model(str(model_dir))
        torch.manual_seed(seed)
        # init_lora_weights=False leaves B random (not zero), so the adapter visibly changes generation.
        add_adapter(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        adapters[name] = save_adapter(model, root / f"adapter_{name}")
    return {"model": model_dir, "adapters": adapters, "root": root,
            "train": write_jsonl(make_examples(16, seed=0), root / "train.jsonl")}


def greedy_ids(model, tokenizer, n_tokens: int) -> list[int]:
    """What `lorakit generate --prompt hi` generates, computed through the library."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def adapter_text(tiny, names: list[str], n_tokens: int) -> str:
    model, tokenizer = load_model(str(tiny["model"]))
    for name in names:
        load_adapter(model, tiny["adapters"][name], name=name)
    return tokenizer.decode(greedy_ids(model, tokenizer, n_tokens), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- help

def _subparsers() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_help_of_every_subcommand_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    options = [s for a in _subparsers()[command]._actions for s in a.option_strings if s.startswith("--")]
    assert options and all(option in out for option in options)


# ------------------------------------------------------------------------------------------- train errors

GOOD = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})


@pytest.mark.parametrize("bad_line, says", [
    ('{"messages": [{"role": "user", "content": "x"}', "invalid JSON"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "messages[0]"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
     "content must be a string, got int"),
])
def test_bad_data_line_exits_2_naming_file_and_line(bad_line, says, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(f"{GOOD}\n{GOOD}\n{bad_line}\n{GOOD}\n")
    out = tmp_path / "run"
    assert main(["train", "--set", f"train_file={data}", "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{data}:3:" in line and says in line
    assert not out.exists()


def test_finished_run_is_not_overwritten_without_overwrite(tiny, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(tiny["model"], tiny["train"], tmp_path / "run",
                                                       max_steps=2)))
    assert main(["train", str(config), "--quiet"]) == 0
    results = tmp_path / "run" / "results.json"
    first = results.stat().st_mtime_ns
    capsys.readouterr()

    assert main(["train", str(config), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a finished run" in line and "--overwrite" in line
    assert results.stat().st_mtime_ns == first

    (tmp_path / "run" / "stale.txt").write_text("from the old run")
    assert main(["train", str(config), "--quiet", "--overwrite"]) == 0
    assert not (tmp_path / "run" / "stale.txt").exists() and results.stat().st_mtime_ns != first
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------- generate

def test_generate_with_an_adapter_prints_the_greedy_answer(tiny, capsys):
    expected = adapter_text(tiny, ["a"], 5)
    code = main(["generate", "--model", str(tiny["model"]), "--adapter", str(tiny["adapters"]["a"]),
                 "--prompt", PROMPT, "--max-new-tokens", "5"])
    assert code == 0
    # The command prints nothing itself: every character on stdout came through the TextStreamer.
    out = capsys.readouterr().out
    assert out.strip() and out.strip() == expected.strip()


def test_generate_picks_the_active_adapter_by_name(tiny, capsys):
    texts = {name: adapter_text(tiny, [name], 8) for name in ("a", "b")}
    assert texts["a"] != texts["b"]
    for name in ("a", "b"):
        code = main(["generate", "--model", str(tiny["model"]), "--adapter", f"a={tiny['adapters']['a']}",
                     "--adapter", f"b={tiny['adapters']['b']}", "--active", name, "--prompt", PROMPT,
                     "--max-new-tokens", "8"])
        assert code == 0 and capsys.readouterr().out.strip() == texts[name].strip()


def test_generate_unknown_active_adapter_is_one_line_error(tiny, capsys):
    code = main(["generate", "--model", str(tiny["model"]), "--adapter", f"a={tiny['adapters']['a']}",
                 "--active", "c", "--prompt", PROMPT])
    assert code == 2
    assert "'c'" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------- merge

def test_merge_writes_a_transformers_folder_that_generates_like_the_adapter(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny["model"]), "--adapter", str(tiny["adapters"]["a"]),
                 "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tokenizer = load_model(str(tiny["model"]))
    base_ids = greedy_ids(model, tokenizer, 20)
    load_adapter(model, tiny["adapters"]["a"])
    adapter_ids = greedy_ids(model, tokenizer, 20)
    assert adapter_ids != base_ids  # the adapter matters, so equality below means the merge is right
    assert greedy_ids(merged, tokenizer, 20) == adapter_ids
    assert (out / "tokenizer_config.json").is_file()


def test_merge_into_non_empty_out_needs_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    code = main(["merge", "--model", str(tiny["model"]), "--adapter", str(tiny["adapters"]["a"]),
                 "--out", str(out)])
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not empty" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "user file"


def test_non_utf8_and_empty_data_exit_2_and_write_nothing(tmp_path, capsys):
    for name, content, says in (("bad.jsonl", GOOD.encode() + b"\n\xff\xfe oops\n", "not UTF-8"),
                                ("empty.jsonl", b"\n\n", "")):
        data = tmp_path / name
        data.write_bytes(content)
        out = tmp_path / f"run-{name}"
        assert main(["train", "--set", f"train_file={data}", "--out", str(out), "--quiet"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(data) in line and says in line
        assert not out.exists()
