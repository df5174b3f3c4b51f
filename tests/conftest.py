"""Shared fixtures (helpers for tests live in helpers.py)."""

import pytest
import torch
from helpers import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 128, (2, 16))
