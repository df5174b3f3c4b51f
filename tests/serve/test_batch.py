"""`lorakit generate --requests FILE.jsonl`: every line through the engine, JSONL results, one-line errors."""

import json

import pytest
import torch
from helpers import build_tiny_model_folder

import lorakit as lk
from lorakit.cli import main
from lorakit.serve.engine import Engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    folder = build_tiny_model_folder(root / "model")
    adapters = {}
    for index, name in enumerate(("dates", "tone")):
        model, _ = lk.load_model(str(folder))
        torch.manual_seed(index)
        lk.add_adapter(model, lk.LoraConfig(r=4 * (index + 1), target_modules="all-linear", init_lora_weights=False))
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(std=0.5)
        adapters[name] = lk.save_adapter(model, root / name)
    return {"model": folder, "adapters": adapters, "root": root}


def write_requests(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


REQUESTS = [{"id": "r1", "prompt": "hello there", "adapter": "dates", "max_new_tokens": 5},
            {"id": "r2", "messages": [{"role": "user", "content": "What is 1 + 2?"}], "adapter": None},
            {"prompt": "the date", "adapter": {"dates": 0.5, "tone": 0.5}, "max_new_tokens": 3},
            {"id": 4, "prompt": "hi", "adapter": "tone", "stop": ["zzz"]}]


def test_requests_file_runs_through_the_engine_in_order(tiny, tmp_path, capsys):
    requests = write_requests(tmp_path / "requests.jsonl", REQUESTS)
    out = tmp_path / "results.jsonl"
    code = main(["generate", "--model", str(tiny["model"]), "--adapter", f"dates={tiny['adapters']['dates']}",
                 "--adapter", f"tone={tiny['adapters']['tone']}", "--requests", str(requests), "--output", str(out),
                 "--max-new-tokens", "4", "--quiet"])
    assert code == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["r1", "r2", 2, 4]
    model, tokenizer = lk.load_model(str(tiny["model"]))
    engine = Engine(model, tokenizer, max_model_len=128)
    for name, path in tiny["adapters"].items():
        engine.add_adapter(name, path)
    prompts = [item.get("prompt", item.get("messages")) for item in REQUESTS]
    expected = [engine.generate([p], [item["adapter"]], max_new_tokens=item.get("max_new_tokens", 4))[0]
                for p, item in zip(prompts, REQUESTS)]
    assert [r["text"] for r in results] == [e.text for e in expected]  # batched = each run alone
    assert [r["prompt_tokens"] for r in results] == [e.prompt_tokens for e in expected]
    assert [(r["completion_tokens"], r["finish_reason"]) for r in results] == [
        (e.completion_tokens, e.finish_reason) for e in expected]
    assert all(r["completion_tokens"] <= n for r, n in zip(results, [5, 4, 3, 4]))  # each line's own limit


@pytest.mark.parametrize(("lines", "message"), [
    (["{not json"], "requests.jsonl:1: not valid JSON"),
    ([{"prompt": "a"}, {"prompt": "b", "messages": []}], "requests.jsonl:2: give exactly one of"),
    ([{"prompt": "a", "adaptor": "x"}], "requests.jsonl:1: unknown key 'adaptor'"),
    ([{"prompt": "a", "max_new_tokens": 0}], "requests.jsonl:1: \"max_new_tokens\" must be a positive integer"),
    ([""], "requests.jsonl: no requests"),
    ([{"prompt": "a", "adapter": "nope"}], "request 1: unknown adapter 'nope'; known adapters: dates"),
    ([{"prompt": "a"}, {"prompt": "b", "temperature": "hot"}], "request 2: temperature must be >= 0"),
])
def test_bad_request_files_exit_2_with_one_line_and_write_nothing(tiny, tmp_path, capsys, lines, message):
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "results.jsonl"
    code = main(["generate", "--model", str(tiny["model"]), "--adapter", f"dates={tiny['adapters']['dates']}",
                 "--requests", str(requests), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
