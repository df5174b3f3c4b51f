"""Hugging Face `Trainer` / TRL `SFTTrainer` users get PEFT adapter folders from every save.

The Trainer saves a lorakit model with `save_pretrained`, the whole model under lorakit's wrapped key
names, which nothing loads as an adapter. This callback writes each adapter as a PEFT folder into every
checkpoint folder and, at the end of training, into the output folder, where `lk.load_adapter` and
`peft.PeftModel.from_pretrained` read it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lorakit.inject import adapter_configs
from lorakit.peft_format import save_adapter


def save_adapters(model: nn.Module, folder: Path) -> list[Path]:
    """Every adapter of `model` as a PEFT folder: "default" at the top, others in sub-folders by name (as PEFT)."""
    return [save_adapter(model, folder if name == "default" else folder / name, name)
            for name in adapter_configs(model)]


class AdapterCallback(TrainerCallback):
    """Write the model's adapters as PEFT folders into each checkpoint and, when training ends, the output folder."""

    def __init__(self, final_dir: str | Path | None = None) -> None:
        self.final_dir = None if final_dir is None else Path(final_dir)

    def on_save(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """Beside the Trainer's checkpoint files, in the same checkpoint-N folder."""
        if model is not None and state.is_world_process_zero:
            save_adapters(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        """The final adapter, in `final_dir` (default: the Trainer's output_dir)."""
        if model is not None and state.is_world_process_zero:
            save_adapters(model, self.final_dir or Path(args.output_dir))
