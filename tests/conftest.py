"""Shared fixtures: small random-init transformers models built from configs (no downloads)."""

import pytest
import torch


def tiny_llama(seed: int = 0, vocab: int = 128, hidden: int = 64, layers: int = 2, tie: bool = False):
    """A random-init LlamaForCausalLM small enough for unit tests (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A random-init GPT2LMHeadModel (its projections are transformers Conv1D, fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 16))
