"""Test-session settings: one worker of ``make test`` (pytest-xdist, 2 workers) uses its share of the cores."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # no oversubscription: far faster

# scripts that the tests launch on several ranks (deepspeed --num_gpus 2 ...): run there, never imported here
collect_ignore_glob = ["_deepspeed_*.py"]
