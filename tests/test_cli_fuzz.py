"""Every subcommand against malformed values and file states: exit 2, one line on stderr, nothing changed.

The file states are the ones users produce: missing, a file where a folder is expected (and the reverse),
a read-only folder, not UTF-8, not JSON/YAML, empty, truncated. Each case snapshots the whole working
tree (every path and its bytes) before the command and checks it is unchanged after: a failed command
writes nothing, half or whole.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import build_tiny_model_folder

from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.inject import add_adapter
from lorakit.models import load_model
from lorakit.peft_format import save_adapter
from lorakit.train.demo_task import make_examples, write_jsonl

REPO = Path(__file__).resolve().parents[1]
GOOD = json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A working folder with a tiny model, an adapter, good data and every kind of broken file."""
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = build_tiny_model_folder(root / "model")
    model, _ = load_model(str(model_dir))
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    save_adapter(model, root / "adapter")
    write_jsonl(make_examples(8, seed=0), root / "good.jsonl")
    (root / "file.txt").write_text("a plain file\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9 \xff\xfe\n")
    (root / "latin1.json").write_bytes(b'{"caf\xe9": 1}')
    (root / "notjson.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "empty_answers.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": " "}]})
        + "\n" for i in range(4)))
    (root / "notyaml.yaml").write_text("model: [unclosed\n")
    (root / "scalar.yaml").write_text("just a string\n")
    (root / "good.yaml").write_text(f"model: {model_dir}\nquantize: null\ntrain_file: {root / 'good.jsonl'}\n"
                                    f"output_dir: {root / 'runs' / 'new'}\nmax_steps: 1\ntensorboard: false\n")
    # broken adapters and models
    for name, config, weights in (("adapter_badjson", b"{oops", None), ("adapter_latin1", b"\xff\xfe", None),
                                  ("adapter_list", b"[]", None), ("adapter_truncated", None, b"trunc")):
        folder = root / name
        shutil.copytree(root / "adapter", folder)
        if config is not None:
            (folder / "adapter_config.json").write_bytes(config)
        if weights is not None:
            data = (folder / "adapter_model.safetensors").read_bytes()
            (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    rank_mismatch = root / "adapter_rank_mismatch"
    shutil.copytree(root / "adapter", rank_mismatch)
    config = json.loads((rank_mismatch / "adapter_config.json").read_text())
    (rank_mismatch / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    for name, change in (("model_badconfig", "config"), ("model_noweights", "weights"),
                         ("model_truncated", "truncate")):
        folder = root / name
        shutil.copytree(model_dir, folder)
        if change == "config":
            (folder / "config.json").write_text("{broken")
        elif change == "weights":
            (folder / "model.safetensors").unlink()
        else:
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    (root / "runs" / "done").mkdir(parents=True)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its bytes (folders as 'dir')."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


# (argv with {root} for the working folder, a fragment the one error line must hold)
CASES = [
    # no or unknown command and options
    ([], "required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # train: the config file
    (["train", "{root}/missing.yaml"], "no such config file"),
    (["train", "{root}/emptydir"], "no such config file"),
    (["train", "{root}/latin1.txt"], "not UTF-8"),
    (["train", "{root}/notyaml.yaml"], "not valid YAML"),
    (["train", "{root}/scalar.yaml"], "expected a mapping"),
    (["train", "{root}/empty"], "train_file is not set"),
    # train: --set values
    (["train", "{root}/good.yaml", "--set", "batch_size"], "expected key=value"),
    (["train", "{root}/good.yaml", "--set", "batch_sise=2"], "did you mean 'batch_size'"),
    (["train", "{root}/good.yaml", "--set", "lora.rank=2"], "unknown lora key 'rank'"),
    (["train", "{root}/good.yaml", "--set", "batch_size=-1"], "batch_size must be an integer >= 1"),
    (["train", "{root}/good.yaml", "--set", "learning_rate=fast"], "learning_rate must be a number"),
    (["train", "{root}/good.yaml", "--set", "learning_rate=-1"], "learning_rate must be > 0"),
    (["train", "{root}/good.yaml", "--set", "quantize=int3"], "quantize must be one of"),
    (["train", "{root}/good.yaml", "--set", "bf16=maybe"], "bf16 must be true or false"),
    (["train", "{root}/good.yaml", "--set", "lora.r=0"], "r"),
    (["train", "{root}/good.yaml", "--set", "max_seq_len=1.5"], "max_seq_len must be an integer"),
    # train: the data
    (["train", "{root}/good.yaml", "--set", "train_file={root}/missing.jsonl"], "no such data file"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/emptydir"], "no such data file"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/latin1.txt"], "not UTF-8"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/notjson.json"], "invalid JSON"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/list.json"], "must be a JSON object"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/empty"], "no examples"),
    (["train", "{root}/good.yaml", "--set", "train_file={root}/empty_answers.jsonl"], "every assistant message"),
    (["train", "{root}/good.yaml", "--set", "val_file={root}/notjson.json"], "invalid JSON"),
    # train: the model
    (["train", "{root}/good.yaml", "--set", "model={root}/missing"], "no such file or folder"),
    (["train", "{root}/good.yaml", "--set", "model={root}/emptydir"], "has no config.json"),
    (["train", "{root}/good.yaml", "--set", "model={root}/file.txt"], "unsupported suffix"),
    (["train", "{root}/good.yaml", "--set", "model={root}/model_badconfig"], "model_badconfig"),
    (["train", "{root}/good.yaml", "--set", "model={root}/model_noweights"], "model_noweights"),
    (["train", "{root}/good.yaml", "--set", "model={root}/model_truncated"], "damaged"),
    # train: the output folder and the flags
    (["train", "{root}/good.yaml", "--set", "output_dir={root}/file.txt"], "is a file, not a folder"),
    (["train", "{root}/good.yaml", "--set", "output_dir={root}/file.txt/run"], "is a file"),
    (["train", "{root}/good.yaml", "--set", "output_dir={root}/model"], "not a lorakit run folder"),
    (["train", "{root}/good.yaml", "--resume"], "nothing to resume: the folder does not exist"),
    (["train", "{root}/good.yaml", "--set", "output_dir={root}/runs/done", "--resume"],
     "nothing to resume: the folder is empty"),
    (["train", "{root}/good.yaml", "--resume", "--overwrite"], "contradict"),
    # generate
    (["generate", "--max-new-tokens", "-5"], "expected a whole number >= 1, got -5"),
    (["generate", "--max-new-tokens", "0"], "expected a whole number >= 1"),
    (["generate", "--max-new-tokens", "many"], "expected a whole number >= 1, got 'many'"),
    (["generate", "--temperature", "-1"], "expected a finite number >= 0"),
    (["generate", "--temperature", "nan"], "expected a finite number >= 0"),
    (["generate", "--quantize", "int3"], "invalid choice"),
    (["generate", "--model", "{root}/missing", "--prompt", "x"], "no such file or folder"),
    (["generate", "--model", "{root}/model_badconfig", "--prompt", "x"], "model_badconfig"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/missing", "--prompt", "x"], "not a folder"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/file.txt", "--prompt", "x"], "not a folder"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/adapter_badjson", "--prompt", "x"],
     "not valid JSON"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/adapter_latin1", "--prompt", "x"],
     "not valid JSON"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/adapter_list", "--prompt", "x"],
     "expected a JSON object"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/adapter_truncated", "--prompt", "x"],
     "corrupt or truncated"),
    (["generate", "--model", "{root}/model", "--adapter", "{root}/adapter_rank_mismatch", "--prompt", "x"],
     "has shape"),
    (["generate", "--model", "{root}/model", "--adapter", "a={root}/adapter", "--active", "b", "--prompt", "x"],
     "'b'"),
    # merge
    (["merge", "--adapter", "{root}/adapter"], "required: --out"),
    (["merge", "--model", "{root}/model", "--adapter", "{root}/adapter", "--out", "{root}/file.txt"],
     "is a file, not a folder"),
    (["merge", "--model", "{root}/model", "--adapter", "{root}/adapter", "--out", "{root}/file.txt/merged"],
     "is a file"),
    (["merge", "--model", "{root}/model", "--adapter", "{root}/adapter", "--out", "{root}/model"], "not empty"),
    (["merge", "--model", "{root}/model", "--adapter", "{root}/missing", "--out", "{root}/merged"], "not a folder"),
    (["merge", "--model", "{root}/model", "--adapter", "{root}/adapter", "--out", "{root}/merged",
      "--dtype", "int8"], "invalid choice"),
    # inspect
    (["inspect", "{root}/missing"], "no such adapter folder"),
    (["inspect", "{root}/file.txt"], "is a file; pass the adapter folder"),
    (["inspect", "{root}/adapter/adapter_model.safetensors"], "is a file; pass the adapter folder"),
    (["inspect", "{root}/emptydir"], "no such file"),
    (["inspect", "{root}/adapter_badjson"], "not valid JSON"),
    (["inspect", "{root}/adapter_latin1"], "not valid JSON"),
    (["inspect", "{root}/adapter_truncated"], "corrupt or truncated"),
    # estimate
    (["estimate", "--model", "{root}/notjson.json"], "not valid JSON"),
    (["estimate", "--model", "{root}/latin1.txt"], "is not a config.json, a model folder or a .safetensors"),
    (["estimate", "--model", "{root}/latin1.json"], "is not UTF-8 text"),
    (["estimate", "--model", "{root}/model/model.safetensors", "--set", "lora.target_modules=[nope]"],
     "targets=['nope'] not understood"),
    (["estimate", "--model", "{root}/model_badconfig"], "not valid JSON"),
    (["estimate", "--model", "{root}/list.json"], "expected a JSON object"),
    (["estimate", "--model", "{root}/missing.json"], "no config file"),
    (["estimate", "--model", "{root}/emptydir"], "has no config.json"),
    (["estimate", "--model", "llama-9000b"], "unknown model preset"),
    (["estimate", "--rank", "0"], "expected a whole number >= 1"),
    (["estimate", "--batch", "-2"], "expected a whole number >= 1"),
    (["estimate", "--seq-len", "x"], "expected a whole number >= 1"),
    (["estimate", "--method", "prefix"], "invalid choice"),
    (["estimate", "--plot", "{root}/missing/m.png"], "does not exist"),
    (["estimate", "--plot", "{root}/emptydir"], "is a folder"),
    (["estimate", "--plot", "{root}/m.jpg"], "expected a .png file name"),
    (["estimate", "{root}/notyaml.yaml"], "not valid YAML"),
    (["estimate", "{root}/missing.yaml"], "no such config file"),
    (["estimate", "{root}/good.yaml", "--set", "lora.r=-3"], "r"),
    (["estimate", "{root}/latin1.txt"], "not UTF-8"),
    (["estimate", "{root}/scalar.yaml"], "expected a mapping"),
    (["estimate", "{root}/emptydir"], "no such config file"),
    (["estimate", "--set", "batch_size=0"], "batch_size must be an integer >= 1"),
    (["estimate", "--baseline-mb", "-1"], "expected a finite number >= 0"),
    (["estimate", "--device", "tpu"], "invalid choice"),
    # demo
    (["demo", "--steps", "0"], "expected a whole number >= 1"),
    (["demo", "--batch-size", "-1"], "expected a whole number >= 1"),
    (["demo", "--heldout", "x"], "expected a whole number >= 1"),
    (["demo", "--out", "{root}/file.txt"], "is a file, not a folder"),
]


@pytest.mark.parametrize(("argv", "says"), CASES, ids=[" ".join(a)[:60] or "(none)" for a, _ in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, argv, says, capfd):
    before = snapshot(world)
    capfd.readouterr()
    code = main([part.replace("{root}", str(world)) for part in argv])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), err
    assert "Traceback" not in err and says.replace("{root}", str(world)) in lines[0], lines[0]
    assert snapshot(world) == before


def _run_as_unprivileged(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m lorakit.cli ARGV` bound by file permissions: as root, without the capabilities that bypass them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HOME": str(cwd / "home")}
    # root writes anywhere through CAP_DAC_OVERRIDE; setpriv (util-linux) drops it for the child only
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-m", "lorakit.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_read_only_output_folders_exit_2_before_loading_anything(world):
    """As a user who may not write there: train's output_dir (and a replaced run's parent), merge's and demo's --out."""
    shared = Path(tempfile.mkdtemp(prefix="lorakit-ro-"))
    try:
        shutil.copytree(world / "model", shared / "model")
        shutil.copytree(world / "adapter", shared / "adapter")
        shutil.copy(world / "good.jsonl", shared / "good.jsonl")
        (shared / "home").mkdir()
        (shared / "locked").mkdir()
        finished = shared / "locked_parent" / "run"  # a finished run that may be written, in a folder that may not
        finished.mkdir(parents=True)
        (finished / "config.yaml").write_text("max_steps: 1\n")
        (finished / "results.json").write_text("{}")
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o777 if path.name == "home" else (0o755 if path.is_dir() else 0o644))
        (shared / "locked").chmod(0o555)
        (shared / "locked_parent").chmod(0o555)
        before = snapshot(shared)
        for argv in (
            ["train", "--set", f"train_file={shared / 'good.jsonl'}", "--set", f"model={shared / 'model'}",
             "--out", str(shared / "locked" / "run"), "--quiet"],
            ["merge", "--model", str(shared / "model"), "--adapter", str(shared / "adapter"),
             "--out", str(shared / "locked" / "merged")],
            ["demo", "--out", str(shared / "locked" / "demo"), "--quiet"],
            # --overwrite moves the old run aside by a rename in its parent: refused before the model loads
            ["train", "--set", f"train_file={shared / 'good.jsonl'}", "--set", f"model={shared / 'model'}",
             "--out", str(finished), "--overwrite", "--quiet"],
        ):
            result = _run_as_unprivileged(argv, shared)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2, result.stderr
            assert len(lines) == 1 and "cannot write in" in lines[0] and "Permission denied" in lines[0], lines
            assert snapshot(shared) == {k: v for k, v in before.items()} | {
                k: v for k, v in snapshot(shared).items() if k.startswith("home")}
    finally:
        shutil.rmtree(shared, ignore_errors=True)
