"""lk.Engine: a mixed batch over many adapters gives each request what PEFT gives it alone, token for token."""

import pytest
import torch
from helpers import build_tiny_model_folder
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.serve.engine import Engine

# (rank, targets): different ranks, alphas and target sets; four made by peft itself, four by lorakit
SPECS = [(2, "all-linear"), (4, ["q_proj", "v_proj"]), (8, ["o_proj", "down_proj"]), (16, ["gate_proj", "up_proj"]),
         (32, "all-linear"), (3, ["k_proj"]), (5, ["q_proj", "k_proj", "v_proj", "o_proj"]), (12, ["down_proj"])]
PROMPTS = ["hello there what is", "the date 3 4 5", "what is 1 + 2 ?", "hi", "the 4th of july", "Dec 25 1985",
           "a b c d e f g", "one two", "the year 2021 was", "ok"]
NEW_TOKENS = 10


def _randomize_b(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    folder = build_tiny_model_folder(root / "model")
    paths = {}
    for index, (rank, targets) in enumerate(SPECS):
        model = AutoModelForCausalLM.from_pretrained(folder)
        torch.manual_seed(index)
        if index % 2 == 0:
            model = get_peft_model(model, PeftLoraConfig(r=rank, lora_alpha=rank + index, target_modules=targets,
                                                         init_lora_weights=False))
            _randomize_b(model)
            model.save_pretrained(root / f"a{index}")
        else:
            lk.add_adapter(model, lk.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                init_lora_weights=False, use_rslora=index == 3))
            _randomize_b(model)
            lk.save_adapter(model, root / f"a{index}")
        paths[f"a{index}"] = root / f"a{index}"
    return {"folder": folder, "paths": paths, "tokenizer": AutoTokenizer.from_pretrained(folder), "root": root}


def make_engine(setup, skip=(), **kwargs):
    engine = Engine(AutoModelForCausalLM.from_pretrained(setup["folder"]), setup["tokenizer"], **kwargs)
    for name, path in setup["paths"].items():
        if name not in skip:
            engine.add_adapter(name, path)
    return engine


def peft_alone(setup, prompt, adapter, new_tokens=NEW_TOKENS):
    """The request run by itself: PeftModel.from_pretrained on its adapter (or the bare base), greedy generate."""
    tokenizer = setup["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(setup["folder"])
    if isinstance(adapter, str):
        model = PeftModel.from_pretrained(model, setup["paths"][adapter])
    elif isinstance(adapter, dict):  # a blend: peft's "cat" combination is exactly the weighted sum of updates
        names = list(adapter)
        model = PeftModel.from_pretrained(model, setup["paths"][names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(setup["paths"][name], adapter_name=name)
        model.add_weighted_adapter(names, list(adapter.values()), "blend", combination_type="cat")
        model.set_adapter("blend")
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[: tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens else tokens


def test_mixed_batch_over_eight_adapters_equals_each_request_alone_in_peft(setup):
    engine = make_engine(setup, max_loras=4, max_cpu_loras=6, max_model_len=64)  # fewer slots than adapters
    adapters = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", None, "a4"]
    results = engine.generate(PROMPTS, adapters, max_new_tokens=NEW_TOKENS)
    for prompt, adapter, result in zip(PROMPTS, adapters, results):
        assert result.token_ids == peft_alone(setup, prompt, adapter), (prompt, adapter)
        assert result.prompt_tokens == len(setup["tokenizer"](prompt, add_special_tokens=False)["input_ids"])
        assert result.completion_tokens == len(result.token_ids)
        assert result.finish_reason == ("length" if len(result.token_ids) == NEW_TOKENS else "stop")
    assert engine.running == [] and engine.waiting == [] and all(a["in_use"] == 0 for a in engine.adapters())


def test_blends_equal_peft_cat_combination(setup):
    engine = make_engine(setup, max_model_len=64)
    blends = [{"a0": 0.7, "a1": 0.3}, {"a2": 1.0, "a3": -0.5, "a5": 2.0}, {"a4": 0.25}]
    results = engine.generate(PROMPTS[:3], blends, max_new_tokens=NEW_TOKENS)
    for prompt, blend, result in zip(PROMPTS, blends, results):
        assert result.token_ids == peft_alone(setup, prompt, blend), blend
    plain = engine.generate([PROMPTS[0]], ["a0"], max_new_tokens=NEW_TOKENS)[0]
    assert results[0].token_ids != plain.token_ids  # the blend is not just its first adapter


def test_requests_joining_and_leaving_mid_batch_equal_their_solo_runs(setup):
    engine = make_engine(setup, max_loras=3, max_batch=4, max_model_len=64)
    plan = [(PROMPTS[i], f"a{i % 8}" if i % 3 else None, 3 + (i * 5) % 9) for i in range(9)]
    solo = [make_engine(setup, max_model_len=64).generate([p], [a], max_new_tokens=n)[0].token_ids
            for p, a, n in plan]
    requests = [engine.submit(p, a, max_new_tokens=n) for p, a, n in plan[:3]]
    steps = 0
    while not all(r.done for r in requests) or len(requests) < len(plan):
        if steps % 2 == 1 and len(requests) < len(plan):  # a new request joins every other step
            p, a, n = plan[len(requests)]
            requests.append(engine.submit(p, a, max_new_tokens=n))
        engine.step()
        assert len(engine.running) <= 4
        steps += 1
    assert [r.output_ids for r in requests] == solo


def test_an_adapter_in_use_is_never_evicted(setup):
    engine = make_engine(setup, max_loras=2, max_cpu_loras=2, max_model_len=64)
    long = engine.submit(PROMPTS[0], "a1", max_new_tokens=20)
    others = [engine.submit(PROMPTS[i], f"a{i}", max_new_tokens=2) for i in (2, 3, 4, 5, 6)]
    while not long.done:
        engine.step()
        if not long.done:
            assert "a1" in engine.cache.slots and "a1" in engine.cache.loaded  # resident and in memory
    while not all(r.done for r in others):
        engine.step()
    assert len(engine.cache.loaded) <= 2 and len(engine.cache.slots) <= 2  # the bounds hold once it is free
    assert engine.cache.evictions["table"] >= 4 and engine.cache.reads >= 6  # 6 adapters through 2 slots
    engine.remove_adapter("a1")
    assert "a1" not in [a["name"] for a in engine.adapters()]


def test_removing_an_adapter_in_use_lets_its_requests_finish_and_refuses_new_ones(setup):
    engine = make_engine(setup, max_loras=2, max_batch=1, max_model_len=64)
    solo = make_engine(setup, max_model_len=64).generate([PROMPTS[0], PROMPTS[1]], ["a1", "a1"], max_new_tokens=6)
    running = engine.submit(PROMPTS[0], "a1", max_new_tokens=6)
    queued = engine.submit(PROMPTS[1], "a1", max_new_tokens=6)  # waits: the batch holds one
    engine.step()
    engine.remove_adapter("a1")
    with pytest.raises(LorakitError, match="unknown adapter 'a1'"):
        engine.submit(PROMPTS[2], "a1")
    assert "a1" in engine.cache.retiring and "a1" in engine.cache.paths  # kept for the two it serves
    while not (running.done and queued.done):
        engine.step()
    assert [running.output_ids, queued.output_ids] == [solo[0].token_ids, solo[1].token_ids]
    assert "a1" not in engine.cache.paths and not engine.cache.retiring and "a1" not in engine.cache.slots


def test_a_cancelled_request_frees_its_slot_and_adapter_at_once(setup):
    engine = make_engine(setup, max_batch=2, max_model_len=64)
    first = engine.submit(PROMPTS[0], "a3", max_new_tokens=20)
    waiting = engine.submit(PROMPTS[1], "a4", max_new_tokens=3)
    engine.step()
    engine.cancel(waiting)  # still queued: it never runs
    assert waiting.finish_reason == "abort" and waiting not in engine.waiting
    engine.cancel(first)
    assert first.finish_reason == "abort" and not engine.running and not engine.cache.pins.get("a3")
    later = engine.submit(PROMPTS[2], "a3", max_new_tokens=4)
    solo = make_engine(setup, max_model_len=64).generate([PROMPTS[2]], ["a3"], max_new_tokens=4)[0]
    while not later.done:
        engine.step()
    assert later.output_ids == solo.token_ids


def test_streaming_steps_hand_out_each_token_as_it_comes(setup):
    engine = make_engine(setup, max_model_len=64)
    request = engine.submit(PROMPTS[1], "a2", max_new_tokens=5)
    seen = []
    while not request.done:
        engine.step()
        seen.append(list(request.new_tokens))
        request.new_tokens.clear()
    # one token per step, as it is sampled (an end of sequence ends the stream without a token)
    assert seen[: len(request.output_ids)] == [[token] for token in request.output_ids]
    assert sum(seen, []) == request.output_ids and len(seen) - len(request.output_ids) in (0, 1)


def test_bad_input_gets_a_clear_error_and_leaves_the_engine_unchanged(setup, tmp_path):
    engine = make_engine(setup, skip=("a4",), max_lora_rank=16, max_model_len=32)  # a4 is rank 32
    assert [a["name"] for a in engine.adapters()] == ["a0", "a1", "a2", "a3", "a5", "a6", "a7"]
    with pytest.raises(LorakitError, match="unknown adapter 'nope'; known adapters: a0, a1, a2, a3, a5, a6, a7"):
        engine.submit("hi", "nope")
    with pytest.raises(LorakitError, match="rank 32 .* exceeds max_lora_rank=16"):
        engine.add_adapter("big", setup["paths"]["a4"])
    other = AutoModelForCausalLM.from_config(
        AutoModelForCausalLM.from_pretrained(setup["folder"]).config.__class__(
            vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2))
    lk.add_adapter(other, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.save_adapter(other, tmp_path / "other")
    with pytest.raises(LorakitError, match="made for another model"):
        engine.add_adapter("other", tmp_path / "other")
    with pytest.raises(LorakitError, match="exceeds the engine's context of 32 tokens"):
        engine.submit("hi " * 40, "a0", max_new_tokens=4)
    with pytest.raises(LorakitError, match="unknown adapter 'zz'"):
        engine.submit("hi", {"a0": 0.5, "zz": 0.5})
    with pytest.raises(LorakitError, match="non-empty"):
        engine.submit("hi", {})
    with pytest.raises(LorakitError, match="temperature must be >= 0"):
        engine.submit("hi", "a0", max_new_tokens=4, temperature="hot")
    with pytest.raises(LorakitError, match="stop must be a list of strings"):
        engine.submit("hi", "a0", max_new_tokens=4, stop="zz")
    with pytest.raises(LorakitError, match="seed must be an integer"):
        engine.submit("hi", "a0", max_new_tokens=4, seed=1.5)
    with pytest.raises(LorakitError, match="already added"):
        engine.add_adapter("a0", setup["paths"]["a0"])
    assert [a["name"] for a in engine.adapters()] == ["a0", "a1", "a2", "a3", "a5", "a6", "a7"]
    assert engine.waiting == [] and engine.running == []


def test_chat_messages_use_the_chat_template(setup):
    engine = make_engine(setup, max_model_len=128)
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    text = setup["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    by_messages = engine.generate([messages], ["a3"], max_new_tokens=4)[0]
    by_text = engine.generate([text], ["a3"], max_new_tokens=4)[0]
    assert by_messages.token_ids == by_text.token_ids and by_messages.prompt_tokens == by_text.prompt_tokens


def test_an_nf4_base_serves_the_same_tokens_as_lorakits_own_adapter_layers(setup):
    def quantized():
        model = AutoModelForCausalLM.from_pretrained(setup["folder"], dtype=torch.bfloat16)
        return lk.quantize_model(model, lk.QuantConfig(quant_type="nf4", compute_dtype=torch.bfloat16))

    engine = Engine(quantized(), setup["tokenizer"], max_model_len=64)
    engine.add_adapter("a2", setup["paths"]["a2"])
    ours = engine.generate([PROMPTS[2]], ["a2"], max_new_tokens=6)[0].token_ids
    model = lk.load_adapter(quantized(), setup["paths"]["a2"]).eval()
    ids = torch.tensor([setup["tokenizer"](PROMPTS[2], add_special_tokens=False)["input_ids"]])
    theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=setup["tokenizer"].pad_token_id)[0, ids.shape[1]:].tolist()
    assert ours == theirs
