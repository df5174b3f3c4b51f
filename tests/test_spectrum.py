"""Adapter diagnostics: the spectrum of scale*B@A from the thin factors, effective rank, `lorakit inspect`."""

import pytest
import torch
from helpers import tiny_llama

from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.inject import adapter_configs, add_adapter, lora_layers
from lorakit.peft_format import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from lorakit.spectrum import delta_singular_values, describe_adapter, effective_rank


@pytest.mark.parametrize("out_features, r, in_features", [(24, 4, 40), (8, 16, 32), (33, 8, 17)])
def test_delta_singular_values_match_the_full_matrix(out_features, r, in_features):
    generator = torch.Generator().manual_seed(out_features)
    B = torch.randn(out_features, r, generator=generator)
    A = torch.randn(r, in_features, generator=generator)
    scale = 2.5
    ours = delta_singular_values(B, A, scale)
    full = torch.linalg.svdvals(scale * B.double() @ A.double()).float()
    assert ours.shape == (min(out_features, r, in_features),)
    torch.testing.assert_close(ours, full[: len(ours)], rtol=1e-4, atol=1e-4)
    assert bool((full[len(ours):] < 1e-4).all())  # rank <= r: the rest of the spectrum is zero


def test_delta_singular_values_of_a_rank_one_update():
    u, v = torch.tensor([[3.0], [4.0], [0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    B, A = torch.cat([u, 2 * u], dim=1), torch.cat([v, v], dim=0)  # B@A = 3 u v^T: rank 1, norm 15
    values = delta_singular_values(B, A, scale=0.5)
    torch.testing.assert_close(values, torch.tensor([7.5, 0.0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("values, rank", [
    ([10.0, 1.0, 0.05, 0.001], 2), ([1.0, 1.0, 1.0], 3), ([0.0, 0.0], 0), ([], 0), ([5.0, 0.0500001], 2),
])
def test_effective_rank_counts_values_above_one_percent(values, rank):
    assert effective_rank(torch.tensor(values)) == rank


def _adapter(tmp_path, rank_one: bool = True, use_rslora: bool = False):
    """A saved r=4 adapter on q/v of the tiny Llama whose B is random, and rank 1 in q_proj if asked."""
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora,
                                  init_lora_weights=False))
    if rank_one:
        with torch.no_grad():
            for name, layer in lora_layers(model):
                if name.endswith("q_proj"):
                    weight = layer.lora_B["default"].weight
                    weight.copy_(weight[:, :1].expand_as(weight).clone())
    return model, save_adapter(model, tmp_path / "adapter")


def test_describe_adapter_reports_config_counts_size_and_rank(tmp_path):
    model, folder = _adapter(tmp_path)
    text = describe_adapter(folder)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    size_mb = ((folder / CONFIG_NAME).stat().st_size + (folder / WEIGHTS_NAME).stat().st_size) / 1e6
    assert "r=4" in text and "lora_alpha=8" in text and "rslora=False" in text
    assert n_params == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)  # 2 layers x (q: 64->64, v: 64->32)
    assert f"adapted layers: 4   parameters: {n_params:,d}" in text
    assert f"size on disk: {size_mb:.2f} MB" in text
    # q_proj updates are rank 1, v_proj updates full rank 4: mean (1+4+1+4)/4.
    assert "effective rank (sv > 1% of max): mean 2.5, max 4" in text


def test_per_layer_lines_give_each_update_norm(tmp_path):
    model, folder = _adapter(tmp_path, use_rslora=True)
    text = describe_adapter(folder, per_layer=True)
    for name, layer in lora_layers(model):
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        norm = float(torch.linalg.matrix_norm((8 / 2) * B.detach() @ A.detach()))  # rsLoRA: alpha / sqrt(r)
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert f"|dW|_F={norm:.4g}" in line and f"eff.rank={1 if 'q_proj' in name else 4}" in line


def test_untrained_adapter_is_called_out(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    text = describe_adapter(save_adapter(model, tmp_path / "adapter"))
    assert "B is still at its zero init" in text and "max 0;" in text


def test_inspect_reads_a_folder_written_by_peft(tmp_path, capsys):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"],
                                                             init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    assert main(["inspect", str(tmp_path / "peft"), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "r=2  lora_alpha=4" in out and "adapted layers: 2   parameters: 384" in out
    assert out.count("k_proj") == 2 and "max 2;" in out


def test_cli_inspect_prints_the_description(tmp_path, capsys):
    _, folder = _adapter(tmp_path)
    assert main(["inspect", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == describe_adapter(folder)


def test_cli_inspect_of_a_non_adapter_folder_is_one_line_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: ") and str(tmp_path) in lines[0]


def test_inspect_describes_vera_and_adalora_folders(tmp_path, capsys):
    """`lorakit inspect` on a VeRA and an AdaLoRA folder: kind, settings, layers and what training changed."""
    import lorakit as lk

    vera = lk.add_adapter(tiny_llama(), lk.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(vera, tmp_path / "vera")
    assert main(["inspect", str(tmp_path / "vera")]) == 0
    out = capsys.readouterr().out
    assert "peft_type VERA  r=8" in out and "adapted layers: 4 " in out
    assert "lambda_b is still at its zero init" in out
    adalora = lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                             target_modules=["q_proj", "v_proj"]))
    adalora.eval()
    adapter_configs(adalora)["default"].rank_pattern = {f"{p}.lora_E": [True, False, True, False]
                                                           for p, _ in lora_layers(adalora)}
    save_adapter(adalora, tmp_path / "adalora")
    assert main(["inspect", str(tmp_path / "adalora")]) == 0
    out = capsys.readouterr().out
    assert "peft_type ADALORA  init_r=4  target_r=2" in out
    assert "kept ranks (rank_pattern): mean 2.00, min 2, max 2 of init_r 4" in out
