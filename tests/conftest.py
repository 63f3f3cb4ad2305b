"""Tests run on every device present. Without CUDA, the CUDA tests (marked `cuda`) are skipped or not generated;
on a GPU machine `python -m pytest -m cuda` runs only them."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
