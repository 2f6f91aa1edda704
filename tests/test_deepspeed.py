"""polyak's EMA on DeepSpeed engines: ZeRO stages 1 to 3 on 2 CPU ranks (gloo), each against a float64 EMA of the
gathered weights (tests/_deepspeed_run.py runs them all in one launch: DeepSpeed's start-up is most of the time)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polyak import EMA

deepspeed = pytest.importorskip("deepspeed")  # polyak[deepspeed], in the dev extra: installed by make install

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(HERE / "_deepspeed_run.py"), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    if done.returncode != 0:
        pytest.fail(
            f"the 2-rank DeepSpeed run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": ranks, "out": out}


CASES = ["stage1", "stage2", "stage3", "stage1-module", "stage3-module", "stage3-persistent", "stage3-bf16"]


@pytest.mark.parametrize("case", CASES)
def test_the_gathered_ema_is_the_float64_ema_of_the_gathered_weights(runs, case: str) -> None:
    for rank in runs["ranks"]:
        r = rank[case]
        tolerance = 4e-3 if "bf16" in case else 5e-7  # a bf16 EMA model: its rounding; float32: a few ulps
        assert r["diff"] < tolerance, r
        assert r["copy_to_diff"] < tolerance, r
        if "bf16" in case:
            assert r["master_diff"] < 5e-7, r  # the float32 master of this rank's partition
        assert r["collectives_in_update"] == 0, r  # an update reads and writes this rank's data only
        assert not r["rebuilt"], r  # ZeRO-3 gathering and freeing parameters between steps is no change


@pytest.mark.parametrize("case", CASES)
def test_swapped_evaluates_the_average_and_gives_the_online_weights_back(runs, case: str) -> None:
    for rank in runs["ranks"]:
        r = rank[case]
        assert r["swapped_diff"] < (2e-2 if "bf16" in case else 1e-6), r
        assert r["online_back"], r


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("stage3")])
def test_zero3_holds_this_ranks_share_and_resumes_exactly(runs, case: str) -> None:
    for rank in runs["ranks"]:
        r = rank[case]
        # half the model per rank (and the padding of the last partitions: at most one element a tensor)
        assert r["model_numel"] / 2 <= r["ema_numel"] <= r["model_numel"] / 2 + 4, r
        assert r["resume_diff"] == 0.0, r  # from this rank's state, and from the whole one
        assert r["other_rank_refused"] and r["untagged_refused"], r
        assert r["skipped_momentum"] == 0.0 and r["num_skipped"] == 1, r  # a NaN on rank 0 alone: both skip
    for r in ("stage1", "stage2"):  # stages 1 and 2: parameters whole, the EMA whole on every rank
        assert runs["ranks"][0][r]["ema_numel"] == runs["ranks"][0][r]["model_numel"]


def test_the_whole_state_of_a_zero3_ema_loads_in_one_process(runs) -> None:
    state = torch.load(runs["out"] / "stage3_full.pt", weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))
    ema = EMA(model, momentum=0.25)
    ema.load_state_dict(state)
    assert ema.num_updates == 6
    for k, v in ema.ema_model.state_dict().items():
        assert torch.equal(v, state["ema_model"][k]), k
    ema.update()  # and it goes on
    assert ema.num_updates == 7
