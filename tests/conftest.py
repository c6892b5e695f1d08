"""Shared test setup: one torch thread (a busy 2-core machine runs far slower with two), and
tests marked ``cuda`` skipped, with the reason said, where no CUDA GPU is visible."""

import pytest
import torch

torch.set_num_threads(1)

CUDA_SKIP_REASON = "needs a CUDA GPU"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
