import pytest
import torch

from quant_helpers import tiny_model


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture
def tokens():
    return torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
