"""The dispatch table: order, conditions with reasons, LORAKIT_KERNELS=reference, the report, the compile fallback."""

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import devices

import lorakit.kernels  # noqa: F401  (registers every operation)
from lorakit.kernels import compile as compile_module
from lorakit.kernels.dispatch import TABLE, reference, select, why_not
from lorakit.kernels.report import example_inputs, report_lines

OPS = ("dequantize_4bit", "attention", "silu_mul", "rms_norm", "lora_linear", "dora_linear", "multi_lora",
       "cache_attention",
       "cross_entropy")


def test_every_operation_is_registered_with_a_reference_last():
    assert set(TABLE) == set(OPS)
    for op, kernels in TABLE.items():
        assert len(kernels) >= 2, op  # a reference and at least one fast implementation
        assert kernels[-1].machine() is None and kernels[-1].accepts() is None, op  # the reference always applies
        assert len({k.name for k in kernels}) == len(kernels), op


@pytest.mark.parametrize("device", devices())
def test_the_fast_path_is_chosen_for_training_shapes_and_the_reference_when_forced(device, monkeypatch):
    inputs = example_inputs(device)
    with torch.enable_grad():
        chosen = {op: select(op, *args) for op, args in inputs.items()}
        assert all(kernel is not reference(op) for op, kernel in chosen.items()), chosen
        for op, args in inputs.items():
            assert why_not(chosen[op], op, *args) is None
        monkeypatch.setenv("LORAKIT_KERNELS", "reference")
        for op, args in inputs.items():
            assert select(op, *args) is reference(op)
            assert why_not(chosen[op], op, *args) == "LORAKIT_KERNELS=reference"


def test_lorakit_compile_0_skips_the_compiled_kernels_with_the_reason(monkeypatch):
    monkeypatch.setenv("LORAKIT_COMPILE", "0")
    args = example_inputs("cpu")["rms_norm"]
    compiled_kernel = TABLE["rms_norm"][0]
    assert why_not(compiled_kernel, "rms_norm", *args) == "LORAKIT_COMPILE=0"
    assert select("rms_norm", *args) is reference("rms_norm")


def test_report_names_the_choice_and_a_reason_for_each_other_implementation():
    lines = report_lines("cpu")
    with torch.enable_grad():
        for op, args in example_inputs("cpu").items():
            head = next(i for i, line in enumerate(lines) if line.startswith(f"{op} "))
            assert lines[head].split() == [op, "uses", select(op, *args).name]
            others = lines[head + 1: head + len(TABLE[op])]
            assert len(others) == len(TABLE[op]) - 1
            assert all(" not used: " in line and line.split(" not used: ")[1] for line in others), others


def test_python_m_lorakit_kernels_prints_the_report():
    out = subprocess.run([sys.executable, "-m", "lorakit.kernels"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert all(any(line.startswith(f"{op} ") and " uses " in line for line in out.splitlines()) for op in OPS), out


def test_a_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = compile_module.compiled(lambda x: x * 2 + 1)
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="compiling <lambda> failed .RuntimeError: no C\\+\\+ compiler here"):
        assert torch.equal(kernel(x), x * 2 + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call falls back silently
        assert torch.equal(kernel(x), x * 2 + 1)
    assert kernel.failure == "RuntimeError: no C++ compiler here"
