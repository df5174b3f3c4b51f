"""`lk.AdapterCallback`: the HF Trainer and TRL's SFTTrainer train a lorakit model and save PEFT adapter folders."""

import pytest
import torch
from datasets import Dataset
from helpers import build_tiny_model_folder
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import lorakit as lk

STEPS = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("hf") / "model")


def lorakit_model(folder):
    """What a user writes: a transformers model, then lorakit's adapter on it."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model


def texts(n: int = 8) -> list[str]:
    return [f"the date {d} of month {m} is {2000 + d}-{m:02d}-{d:02d}" for d, m in zip(range(1, n + 1), range(1, 13))]


def check_saved(model, folder, out):
    """Each checkpoint and the output folder hold a PEFT adapter; the final one is the trained model, in peft."""
    checkpoints = [out / f"checkpoint-{step}" for step in range(1, STEPS + 1)]
    weights = [load_file(c / "adapter_model.safetensors") for c in checkpoints]
    assert all((c / "adapter_config.json").is_file() for c in checkpoints)
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 moved the adapter
    final = load_file(out / "adapter_model.safetensors")
    assert final.keys() == weights[1].keys() and all(torch.equal(final[k], weights[1][k]) for k in final)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    dtype = model.get_input_embeddings().weight.dtype
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), out).eval()
        theirs = peft_model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    reloaded = lk.load_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), checkpoints[-1]).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, ours, atol=1e-5)


def test_hf_trainer_checkpoints_and_final_save_are_peft_adapters(folder, tmp_path):
    model = lorakit_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts(), padding="max_length", max_length=24, truncation=True)
    data = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                              "labels": encoded["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, save_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[lk.AdapterCallback()]).train()
    check_saved(model, folder, tmp_path)


def test_trl_sft_trainer_checkpoints_and_final_save_are_peft_adapters(folder, tmp_path):
    from trl import SFTConfig, SFTTrainer

    model = lorakit_model(folder)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, save_steps=1, per_device_train_batch_size=4,
                     learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
                     max_length=24, bf16=False)  # its default bf16 leaves accelerate's autocast on model.forward
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts()}),
                         processing_class=AutoTokenizer.from_pretrained(folder), callbacks=[lk.AdapterCallback()])
    trainer.train()
    check_saved(model, folder, tmp_path)



def hf_trainer_losses(folder, out, fast: bool) -> list[float]:
    """Per-step training losses of the HF Trainer on a lorakit model, with or without the fast paths."""
    model = lorakit_model(folder)
    if fast:
        switched = lk.enable_fast_training(model, allocator_setting=False)
        assert switched.loss and switched.rms_norm and switched.swiglu
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(texts(), padding="max_length", max_length=24, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
    data = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                              "labels": labels})
    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [record["loss"] for record in trainer.state.log_history if "loss" in record]


def test_hf_trainer_with_the_fast_paths_trains_the_same(folder, tmp_path):
    # Accumulation over unevenly padded micro-batches: the Trainer passes num_items_in_batch, which the
    # fused loss must honour exactly as transformers' own loss does.
    plain = hf_trainer_losses(folder, tmp_path / "plain", fast=False)
    fast = hf_trainer_losses(folder, tmp_path / "fast", fast=True)
    assert len(plain) == len(fast) == 3 and plain[0] > plain[-1]
    assert fast == pytest.approx(plain, rel=1e-4)
