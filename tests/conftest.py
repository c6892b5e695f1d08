"""Shared test setup: one torch thread (a busy 2-core machine runs far slower with two)."""

import torch

torch.set_num_threads(1)
