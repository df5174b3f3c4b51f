"""Arrow-style routing: prototypes are the top right singular vectors of B A; a prompt goes to the adapter whose
prototypes its hidden states align with."""

import torch
from helpers import build_tiny_model_folder

import lorakit as lk
from lorakit.serve.engine import Engine
from lorakit.serve.router import Router, layer_inputs, prototype


def test_prototype_is_the_top_right_singular_vector_of_the_update():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 12, generator=gen), torch.randn(9, 4, generator=gen)
    expected = torch.linalg.svd(B @ A).Vh[0]
    got = prototype(A, B)
    assert torch.allclose(got.abs(), expected.abs(), atol=1e-5) and abs(float(got.norm()) - 1) < 1e-6


def _adapter_along(model_dir, out, directions, seed):
    """A rank-1 adapter on every projection whose update reads exactly `directions[path]` (its prototype)."""
    model, _ = lk.load_model(str(model_dir))
    lk.add_adapter(model, lk.LoraConfig(r=1, target_modules="all-linear", init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                path = name
                module.lora_A["default"].weight.copy_(directions[path][None, :])
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape,
                                                                  generator=gen))
    return lk.save_adapter(model, out)


def test_a_prompt_goes_to_the_adapter_its_hidden_states_align_with(tmp_path):
    folder = build_tiny_model_folder(tmp_path / "model")
    model, tokenizer = lk.load_model(str(folder))
    engine = Engine(model, tokenizer, max_model_len=64)
    prompts = {"match": "The meeting is on the 4th of July, 1999", "other": "Roses are red, violets are blue"}
    means = {}
    for key, text in prompts.items():
        inputs = layer_inputs(engine.model, engine.layers, engine.encode(text))
        means[key] = {path: x.mean(0) / x.mean(0).norm() for path, x in inputs.items()}
    for key in prompts:
        engine.add_adapter(key, _adapter_along(folder, tmp_path / key, means[key], seed=len(key)))
    router = Router()
    for key, text in prompts.items():
        chosen, scores = router.choose(engine, engine.encode(text))
        assert chosen == key, scores
        assert scores[key] > max(s for name, s in scores.items() if name != key)
    assert set(router.cache) == {"match", "other"}  # prototypes computed once per adapter
    router.forget("match")
    assert set(router.cache) == {"other"}
