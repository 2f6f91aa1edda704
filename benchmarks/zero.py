"""ZeRO-3: what polyak's EMA holds and costs on each rank of a DeepSpeed ZeRO-3 engine (2 CPU ranks, gloo).

``measure()`` launches ``deepspeed --num_gpus 2 --module benchmarks.zero --child OUT`` (DeepSpeed's start-up is
most of its time: one launch for everything). Each rank, with one torch thread (two ranks on two cores), builds a
model of Linear layers (a few million parameters), wraps it in a ZeRO-3 engine (every parameter partitioned),
takes one training step, then builds ``EMA(engine)`` and updates it twice. It reports:

* the bytes the EMA holds on the rank: the tensors of its state (this rank's partitions, and the float32 masters of
  a bf16 model); resident memory is no gauge here (the engine's set-up frees more than the EMA takes);
* the same for the whole EMA of the same model in one process (``EMA(model)`` of a plain copy: what every rank
  holds under DDP or ZeRO 1-2);
* cold update times (a 192 MiB buffer written before each call), interleaved in rounds that start together on
  both ranks: the ZeRO-3 EMA's update, the floor (one float32 ``lerp_`` over as many elements as this rank's
  partitions), and the whole EMA's update in one process.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
WIDTH, LAYERS = 768, 8  # 8 x Linear(768, 768): 4.7M parameters, 16 tensors
ROUNDS = 15
EVICT_BYTES = 192 << 20  # written before each cold call (the other tables' 4x the last-level cache: 0.7 s a call here)
MOMENTUM = 0.001
DTYPES = ("float32", "bfloat16")


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS))).to(dtype)


def _state_bytes(ema: Any) -> int:
    """The bytes of the tensors of the EMA's state: its model's (partitions under ZeRO-3) and its masters."""
    state = ema.state_dict()
    tensors = [*state["ema_model"].values(), *state.get("master", {}).values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _child(out: Path) -> None:
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no C++ build at start-up
    import deepspeed

    from polyak import EMA

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    buffer = torch.empty(EVICT_BYTES, dtype=torch.uint8)

    def evict() -> None:
        buffer.fill_(int(buffer[0]) ^ 1)

    rows = []
    started = time.perf_counter()
    for name in DTYPES:
        dtype = getattr(torch, name)
        model = _model(dtype)
        params = sum(p.numel() for p in model.parameters())
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == torch.bfloat16},
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), config=config
        )
        loss = engine(torch.randn(4, WIDTH, dtype=dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        partition = sum(p.ds_tensor.numel() for p in engine.module.parameters())
        zero, whole = EMA(engine, momentum=MOMENTUM), EMA(_model(dtype), momentum=MOMENTUM)
        a, b = torch.rand(partition), torch.rand(partition)
        calls = {"zero": zero.update, "floor": functools.partial(a.lerp_, b, MOMENTUM), "whole": whole.update}
        samples: dict[str, list[float]] = {k: [] for k in calls}
        order = list(calls)
        shuffle = random.Random(rank)
        for _ in range(ROUNDS):
            shuffle.shuffle(order)
            torch.distributed.barrier()  # both ranks update at once, as they do in training
            for key in order:
                evict()
                t = time.perf_counter()
                calls[key]()
                samples[key].append(time.perf_counter() - t)
        rows.append(
            {
                "rank": rank,
                "dtype": name,
                "params": params,
                "partition_numel": partition,
                "zero_bytes": _state_bytes(zero),
                "whole_bytes": _state_bytes(whole),
                **{f"{k}_median_s": statistics.median(v) for k, v in samples.items()},
                **{f"{k}_min_s": min(v) for k, v in samples.items()},
                "samples": ROUNDS,
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
        )
        del zero, whole, engine, model
        gc.collect()
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, rows)
    if rank == 0:
        (out / "zero.json").write_text(json.dumps([r for rank_rows in everyone for r in rank_rows]))
    torch.distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(out: Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """Launch the 2 ranks; ``{"rows": [...], "config": ...}``, or ``{"error": ...}`` (deepspeed missing, a
    failed launch: the rest of the report stands on its own)."""
    if importlib.util.find_spec("deepspeed") is None:  # (not imported here: its start-up is the child's)
        return {"error": "deepspeed is not installed (pip install 'polyak[deepspeed]')"}
    import tempfile

    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        return {"error": "no deepspeed launcher beside this Python"}
    config = {"width": WIDTH, "layers": LAYERS, "ranks": 2, "threads_per_rank": 1, "rounds": ROUNDS}
    config["evict_bytes"] = EVICT_BYTES
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or tmp)
        command = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "benchmarks.zero"]
        command += ["--child", str(folder)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        started = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "config": config}
        config["elapsed_s"] = round(time.perf_counter() - started, 1)
        result = folder / "zero.json"
        if done.returncode != 0 or not result.is_file():
            tail = (done.stderr.strip() or done.stdout.strip() or "?").splitlines()[-1][:300]
            return {"error": f"the 2-rank launch failed ({done.returncode}): {tail}", "config": config}
        return {"rows": json.loads(result.read_text()), "config": config}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zero", description=__doc__)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = p.parse_args(argv)
    if args.child is not None:
        _child(args.child)
        return 0
    print(json.dumps(measure(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
