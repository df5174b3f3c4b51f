"""`lorakit serve` as a real process on 127.0.0.1, driven by the real `openai` client and plain HTTP (httpx)."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from helpers import Served, build_tiny_model_folder, make_adapter

import lorakit as lk
from lorakit.serve.engine import Engine

BASE = "model"  # the base's id: the --model folder's name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    folder = build_tiny_model_folder(root / BASE)
    adapters = {name: make_adapter(folder, root, name, 4 * (i + 1), i) for i, name in enumerate(("dates", "tone"))}
    adapters["late"] = make_adapter(folder, root, "late", 8, 7, ["q_proj", "v_proj"])
    return {"model": folder, "adapters": adapters, "root": root}


def served_adapters(tiny):
    return {name: tiny["adapters"][name] for name in ("dates", "tone")}


@pytest.fixture(scope="module")
def server(tiny):
    served = Served(tiny["model"], served_adapters(tiny))
    yield served
    assert served.stop() == 0  # Ctrl-C stops it cleanly


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def engine(tiny):
    """The same base and adapters in-process: what each request run alone gives."""
    model, tokenizer = lk.load_model(str(tiny["model"]))
    engine = Engine(model, tokenizer, max_model_len=256)
    for name, path in tiny["adapters"].items():
        engine.add_adapter(name, path)
    return engine


def solo(engine, prompt, adapter, tokens):
    return engine.generate([prompt], [adapter], max_new_tokens=tokens)[0]


CHAT = [{"role": "user", "content": "What is the date today?"}]


def test_banner_names_the_url_and_a_curl_example(server):
    text = "".join(server.banner)
    assert f"{server.url}/v1" in text and f"curl {server.url}/v1/chat/completions" in text
    assert "adapters: dates, tone" in text


def test_models_lists_the_base_and_every_adapter_with_its_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {BASE, "auto", "dates", "tone"}
    assert cards["dates"].parent == BASE and cards["tone"].parent == BASE and cards[BASE].parent is None


def test_chat_completion_equals_the_request_run_alone(client, engine):
    reply = client.chat.completions.create(model="dates", messages=CHAT, max_tokens=8, temperature=0)
    expected = solo(engine, CHAT, "dates", 8)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_completion_streamed_and_whole_agree_with_the_engine(client, engine):
    whole = client.completions.create(model="tone", prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tone", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = solo(engine, "Once upon a time", "tone", 10)
    assert whole.choices[0].text == streamed == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens  # the usage chunk comes last
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # it arrived in pieces


def test_chat_streamed_through_the_openai_client_equals_the_whole_reply(client, engine):
    chunks = list(client.chat.completions.create(model="tone", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model="tone", messages=CHAT, max_tokens=8, temperature=0)
    assert streamed == whole.choices[0].message.content == solo(engine, CHAT, "tone", 8).text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_unloading_an_adapter_in_use_lets_its_stream_finish_then_404(server, client, tiny, engine):
    load = httpx.post(f"{server.url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "busy", "lora_path": str(tiny["adapters"]["late"])})
    assert load.status_code == 200, load.text
    stream = client.completions.create(model="busy", prompt="Once upon a time", max_tokens=200, temperature=0,
                                       stream=True)
    first = next(stream)  # running now
    unload = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "busy"}, timeout=60)
    assert unload.status_code == 200, unload.text
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert "lorakit_running_requests 1.0" in metrics  # the unload came while its request ran
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="busy", prompt="hi", max_tokens=2)
    text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
    assert text == solo(engine, "Once upon a time", "late", 200).text  # it finished, and correctly
    assert "busy" not in {m.id for m in client.models.list().data}


def test_chat_stream_starts_with_the_role_and_ends_with_done(server, engine):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == solo(engine, CHAT, None, 6).text  # the base model: no adapter


def test_n_choices_and_seeded_sampling_repeat(client):
    kwargs = {"model": "dates", "prompt": "hello", "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the same seeds, the same draws
    assert len({c.text for c in first.choices}) > 1  # each choice has its own seed


def test_a_blend_equals_the_engines_blend(client, engine):
    blend = {"dates": 0.7, "tone": 0.3}
    reply = client.completions.create(model=BASE, prompt="the day after", max_tokens=8, temperature=0,
                                      extra_body={"adapters": blend})
    assert reply.choices[0].text == solo(engine, "the day after", blend, 8).text
    assert reply.model_extra["adapters"] == blend  # the response says which adapters answered


def test_load_use_unload_then_404(server, client, tiny, engine):
    load = httpx.post(f"{server.url}/v1/load_lora_adapter", timeout=60,
                      json={"lora_name": "late", "lora_path": str(tiny["adapters"]["late"])})
    assert load.status_code == 200, load.text
    assert "late" in {m.id for m in client.models.list().data}
    reply = client.completions.create(model="late", prompt="hello", max_tokens=5, temperature=0)
    assert reply.choices[0].text == solo(engine, "hello", "late", 5).text
    unload = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert unload.status_code == 200, unload.text
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="late", prompt="hello", max_tokens=5)
    assert caught.value.body["code"] == "model_not_found" and "dates" in caught.value.body["message"]
    again = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert again.status_code == 404 and again.json()["error"]["param"] == "lora_name"


def test_auto_routes_to_a_loaded_adapter_and_says_which(client, engine):
    reply = client.completions.create(model="auto", prompt="The date is", max_tokens=6, temperature=0)
    (chosen, weight), = reply.model_extra["adapters"].items()
    assert chosen in ("dates", "tone") and weight == 1.0
    assert reply.choices[0].text == solo(engine, "The date is", chosen, 6).text


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"model": BASE, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"model": BASE, "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": BASE, "prompt": "hi", "n": 0}, "n"),
    ({"model": BASE, "prompt": ""}, "prompt"),
    ({"prompt": "hi"}, "model"),
])
def test_wrong_fields_are_400_naming_the_field(server, body, param):
    error = _error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=30), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_json_nan_and_empty_messages_are_400(server):
    bad = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "model", "prompt": ', timeout=30,
                     headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(bad, 400)["message"]
    nan = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "model", "prompt": "x", "temperature": NaN}',
                     headers={"content-type": "application/json"}, timeout=30)
    assert _error(nan, 400)["param"] == "temperature"
    empty = httpx.post(f"{server.url}/v1/chat/completions", json={"model": BASE, "messages": []}, timeout=30)
    assert _error(empty, 400)["param"] == "messages"


def test_unknown_model_is_404_naming_the_loaded_ones(server):
    error = _error(httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=30), 404)
    assert error["code"] == "model_not_found" and "nope" in error["message"]
    assert all(name in error["message"] for name in (BASE, "dates", "tone"))


def test_a_prompt_longer_than_the_context_is_400(server):
    body = {"model": BASE, "prompt": "word " * 400, "max_tokens": 4}
    assert "context" in _error(httpx.post(f"{server.url}/v1/completions", json=body, timeout=30), 400)["message"]


def test_bad_adapters_are_refused_and_change_nothing(server, client, tiny, tmp_path):
    before = sorted(m.id for m in client.models.list().data)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tiny["adapters"]["dates"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny["adapters"]["dates"] / "adapter_config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    other = build_tiny_model_folder(tmp_path / "other")  # same tokenizer, another shape
    import transformers

    config = transformers.AutoConfig.from_pretrained(other)
    config.hidden_size, config.intermediate_size = 48, 96
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(other)
    mismatched = make_adapter(other, tmp_path, "mismatched", 4, 0)
    for name, path in (("missing", tmp_path / "absent"), ("corrupt", corrupt), ("pickled", pickled),
                       ("mismatched", mismatched), ("dates", tiny["adapters"]["tone"])):
        response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                              timeout=60)
        assert _error(response, 400)["message"], name
    assert sorted(m.id for m in client.models.list().data) == before
    assert client.completions.create(model="dates", prompt="hi", max_tokens=2).choices[0].text is not None


def test_metrics_count_requests_tokens_and_adapters(server, client):
    client.completions.create(model="dates", prompt="hi", max_tokens=3, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['lorakit_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert values["lorakit_generated_tokens_total"] >= 3
    assert values["lorakit_time_to_first_token_seconds_count"] >= 1
    assert values["lorakit_adapters_registered"] == 2 and values["lorakit_adapters_in_memory"] >= 2
    assert values["lorakit_adapter_loads_total"] >= 2 and values["lorakit_queue_depth"] == 0
    assert 'lorakit_adapter_evictions_total{tier="memory"}' in values
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    body = {"model": "dates", "prompt": "count", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # one chunk, then hang up
    deadline = time.time() + 5
    while time.time() < deadline:
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        if "lorakit_running_requests 0.0" in metrics:
            break
        time.sleep(0.05)
    assert "lorakit_running_requests 0.0" in metrics


def test_api_key_and_a_full_queue(tiny):
    served = Served(tiny["model"], served_adapters(tiny), "--api-key", "s3cret", "--max-queue", "1", "--max-batch", "1")
    try:
        bare = httpx.get(f"{served.url}/v1/models", timeout=30)
        assert _error(bare, 401)["type"] == "authentication_error"
        wrong = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
        keyed = openai.OpenAI(base_url=f"{served.url}/v1", api_key="s3cret")
        assert {m.id for m in keyed.models.list().data} == {BASE, "auto", "dates", "tone"}
        statuses, lock = [], threading.Lock()

        def ask():
            response = httpx.post(f"{served.url}/v1/completions", headers={"Authorization": "Bearer s3cret"},
                                  json={"model": "dates", "prompt": "go", "max_tokens": 200, "temperature": 0},
                                  timeout=120)
            with lock:
                statuses.append((response.status_code, response.headers.get("retry-after")))

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert (429, "1") in statuses and (200, None) in statuses  # one runs, one waits, the rest are told to retry
        assert all(status in (200, 429) for status, _ in statuses)
    finally:
        assert served.stop() == 0


def test_a_taken_port_is_a_one_line_error(tiny):
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny["model"]), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"lorakit: error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in proc.stderr
