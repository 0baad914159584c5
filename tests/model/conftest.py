"""Fixtures for the reference-model tests: a seeded random tiny VISOR held in memory."""

import pytest
import torch

from visor_vllm.testing import random_tiny_model

ROUTE, IMAGE, IM_START, IM_END = 151648, 151646, 151644, 151645


@pytest.fixture(scope="session")
def tiny_model():
    return random_tiny_model()


@pytest.fixture(scope="session")
def image_inputs():
    """One 50x70 image as LLaVA-OV's processor lays it out: [1, crops, 3, 32, 32], sizes [1, 2]."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 7, 3, 32, 32, generator=g), torch.tensor([[50, 70]])


def prompt(n_vision: int, question=(7, 8, 9), route: bool = True, image_first: bool = False):
    """ChatML-shaped ids: the image block, the question, then the routing token."""
    head = [IM_START, 5, 6]
    image = [IMAGE] * n_vision
    body = list(question) + ([ROUTE] if route else []) + [IM_END, IM_START, 10]
    return torch.tensor(image + head + body if image_first else head + image + body)
