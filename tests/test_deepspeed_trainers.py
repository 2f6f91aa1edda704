"""polyak's trainer callbacks under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), each against a float64 EMA of the
gathered weights: the transformers ``Trainer`` (tests/_deepspeed_transformers.py) and Lightning's
``DeepSpeedStrategy`` (tests/_deepspeed_lightning.py), one ``deepspeed --num_gpus 2`` launch each.

What they show (docs/howto/deepspeed.md says it to users):

* transformers: the Trainer runs under a ZeRO-3 config on the CPU; the callback's EMA holds this rank's partitions,
  is updated once per optimizer step, and evaluates the average. Its checkpoint files hold the EMA whole (gathered
  on every rank, written by rank 0), and every rank takes its partition back.
* Lightning 2.6 refuses DeepSpeed on the CPU; with that refusal (and two more CUDA-only steps) taken out, the
  callback averages the partitions, evaluates the average and checkpoints it whole; ``EMA.copy_to`` of the ZeRO-3
  module (the default ``weights_at_end="ema"``) writes each rank's partition of the average.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")  # polyak[deepspeed], in the dev extra

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, out: Path) -> list[dict]:
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(HERE / script), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        pytest.fail(f"{script} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> list[dict]:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return _launch("_deepspeed_transformers.py", tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def pl(tmp_path_factory) -> list[dict]:
    pytest.importorskip("lightning")
    return _launch("_deepspeed_lightning.py", tmp_path_factory.mktemp("pl"))


# -- transformers ------------------------------------------------------------------------------------------------
def test_the_trainer_runs_zero3_and_the_callbacks_ema_is_the_float64_ema_of_the_gathered_weights(hf) -> None:
    for r in hf:
        assert r["engine"] == "DeepSpeedEngine" and r["zero_stage"] == 3 and r["partitioned"], r
        assert r["model_numel"] / 2 <= r["ema_numel"] <= r["model_numel"] / 2 + 6, r  # this rank's partitions
        assert r["num_updates"] == r["reference_updates"] == 8, r  # once per optimizer step (accumulation 2)
        assert r["diff"] < 5e-7, r


def test_the_trainers_evaluations_use_the_average_and_the_online_weights_come_back(hf) -> None:
    for r in hf:
        assert [e["step"] for e in r["evaluations"]] == [4, 8], r
        for e in r["evaluations"]:
            assert abs(e["reported"] - e["expected"]) < 1e-5, e
        assert r["online_back"], r


def test_the_callbacks_files_hold_the_whole_ema_and_resume_on_every_rank(hf) -> None:
    """Under ZeRO-3 the callback gathers the EMA on every rank (on_save and on_train_end run on every rank) and
    rank 0 writes it whole; every rank takes its partition of it back."""
    r0, r1 = hf
    assert r0["saved_shapes"] == r0["model_shapes"], r0
    assert r0["final_shapes"] == r0["model_shapes"], r0  # final_dir too
    assert not r0["file_is_this_ranks_partitions"] and not r1["file_is_this_ranks_partitions"]
    for r in hf:
        assert r["load"] == "ok" and r["diff_after_load"] < 5e-7, r


# -- Lightning ---------------------------------------------------------------------------------------------------
def test_lightnings_deepspeed_strategy_refuses_the_cpu(pl) -> None:
    for r in pl:
        assert r["stock"] == (
            "RuntimeError: The DeepSpeed strategy is only supported on CUDA GPUs but `CPUAccelerator` is used."
        ), r


def test_without_its_cuda_checks_the_callbacks_ema_is_the_float64_ema_and_checkpoints_whole(pl) -> None:
    for r in pl:
        assert r["fit"] == "ran", r
        assert r["partitioned"] and r["model_numel"] / 2 <= r["ema_numel"] <= r["model_numel"] / 2 + 6, r
        assert r["num_updates"] == r["reference_updates"] == 6, r
        assert r["diff"] < 5e-7, r
        assert abs(r["val_loss"] - r["expected_val_loss"]) < 1e-5, r  # validation with the average
        assert r["online_back"], r
        # the callback's state is the EMA whole (a collective on every rank), in every rank's DeepSpeed file
        assert r["state_diff"] < 5e-7 and r["save_checkpoint"] == "ok", r
        assert r["file_diff"] < 5e-7 and r["file_num_updates"] == 6, r


def test_copy_to_a_zero3_module_writes_each_ranks_partition(pl) -> None:
    """What the Lightning callback's default weights_at_end="ema" does in on_train_end: EMA.copy_to(module) of a
    ZeRO-3 module writes this rank's partition of the average into each parameter's partition."""
    for r in pl:
        assert r["copy_to_module"] == "ok", r
        assert r["copy_to_diff"] < 5e-7, r
