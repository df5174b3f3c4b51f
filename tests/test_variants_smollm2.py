"""VeRA and AdaLoRA on the real SmolLM2-135M (fp32): saved here and loaded by PEFT, and back, with equal logits."""

import peft
import pytest
import torch

import lorakit as lk

VARIANTS = [
    ("vera", lambda: lk.VeraConfig(r=64, target_modules="all-linear"),
     lambda: peft.VeraConfig(r=64, target_modules="all-linear"), ("vera_lambda_b", "vera_lambda_d")),
    ("adalora", lambda: lk.AdaLoraConfig(init_r=6, target_r=4, total_step=100, target_modules="all-linear"),
     lambda: peft.AdaLoraConfig(init_r=6, target_r=4, total_step=100, target_modules="all-linear"), ("lora_E",)),
]


def _perturb(model, names, seed):
    """Move the trained tensors that start at zero (VeRA's lambda_b, AdaLoRA's E): else the output is the base's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in sorted(model.named_parameters()):
            if any(name in key for name in names):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("kind,ours_config,peft_config,trained", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_smollm2_files_both_ways_with_peft(kind, ours_config, peft_config, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.models import convert_gguf, embedded_gguf_path

    folder = convert_gguf(embedded_gguf_path())

    def build():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = build()(ids).logits
    ours = lk.add_adapter(build(), ours_config())
    _perturb(ours, trained, seed=1)
    lk.save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(ids).logits
        got = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")(ids).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output, so equality means something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(build(), peft_config())
    _perturb(theirs, trained, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(lk.load_adapter(build(), tmp_path / "theirs")(ids).logits, theirs(ids).logits,
                                   atol=1e-5, rtol=0)
