"""Tests run on every device present. Without CUDA, the CUDA tests (marked `cuda`) are skipped or not generated;
on a GPU machine `python -m pytest -m cuda` runs only them."""
import signal

import pytest
import torch

# A shell starts a background job (`pytest &`) with SIGINT ignored, and the scripts the tests start would inherit
# that: the Ctrl-C tests need the SIGINT a terminal gives. A Python handler here is reset to the default in every
# child at exec, so the children's Python installs its KeyboardInterrupt handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
