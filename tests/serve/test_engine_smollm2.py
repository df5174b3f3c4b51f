"""On the real SmolLM2-135M-Instruct in fp32: a mixed batch over eight adapters equals each request alone in PEFT."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit as lk

# (rank, alpha, targets): different ranks, alphas and target sets
SPECS = [(8, 16, "all-linear"), (16, 8, ["q_proj", "v_proj"]), (32, 64, ["o_proj", "down_proj"]),
         (4, 4, ["gate_proj", "up_proj"]), (12, 24, "all-linear"), (2, 8, ["k_proj", "v_proj"]),
         (24, 12, ["q_proj", "o_proj", "up_proj"]), (6, 6, ["down_proj"])]
QUESTIONS = ["What is the capital of France?", "Normalise this date: 3rd of March '21", "Name a prime number.",
             "Say hello in Spanish.", "What is 7 times 6?", "Write a haiku about rain.", "Who wrote Hamlet?",
             "List three colours."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from lorakit.models import convert_gguf, embedded_gguf_path

    folder = convert_gguf(embedded_gguf_path())
    root = tmp_path_factory.mktemp("smollm2-adapters")
    paths = []
    for index, (rank, alpha, targets) in enumerate(SPECS):
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        torch.manual_seed(index)
        lk.add_adapter(model, lk.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)  # large enough to change the answers, small enough to keep them text
        paths.append(lk.save_adapter(model, root / f"a{index}"))
    return folder, paths, AutoTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_mixed_batch_on_smollm2_equals_peft_alone_token_for_token(smollm2):
    folder, paths, tokenizer = smollm2
    engine = lk.Engine(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), tokenizer,
                       max_loras=8, max_model_len=128)
    for index, path in enumerate(paths):
        engine.add_adapter(f"a{index}", path)
    messages = [[{"role": "user", "content": question}] for question in QUESTIONS]
    results = engine.generate(messages, [f"a{i}" for i in range(len(paths))], max_new_tokens=NEW_TOKENS)
    base = engine.generate(messages, [None] * len(messages), max_new_tokens=NEW_TOKENS)
    for index, (message, result) in enumerate(zip(messages, results)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True),
                                          paths[index]).eval()
        ids = tokenizer.apply_chat_template(message, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        expected = out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        assert result.token_ids == expected, (index, result.text, tokenizer.decode(expected))
    changed = sum(result.token_ids != plain.token_ids for result, plain in zip(results, base))
    assert changed >= 6, changed  # the adapters really change the answers (a test that could fail)
