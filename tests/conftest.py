"""Shared test setup: no test may touch the network, the repo root is importable, and under pytest-xdist
(`-n auto`: one worker process per core) each worker uses one torch thread, so that they do not contend."""

import os
import sys

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
