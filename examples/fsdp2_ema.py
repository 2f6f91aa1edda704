"""Train an MLP on scikit-learn's digits with FSDP2 (``fully_shard``) and a sharded EMA of its weights.

Run it with torchrun, on CPUs (gloo) or one GPU per process (NCCL)::

    torchrun --nproc_per_node=2 examples/fsdp2_ema.py
    torchrun --nproc_per_node=2 examples/fsdp2_ema.py --bf16 --checkpoint ckpt   # again: resumes from ckpt

FSDP2 modules cannot be deep-copied, so the EMA module is built by us like the model and sharded the same
way, then handed to ``EMA(..., ema_model=...)``, which checks that the two are sharded alike and starts it
from the model's values. Each rank holds and updates only its shard of the EMA. The EMA module is an FSDP
module like the model: it evaluates with a plain forward (on every rank, since its forward all-gathers).

``--checkpoint DIR`` saves a sharded checkpoint (torch.distributed.checkpoint) of the model, the optimizer
and the EMA after every epoch, into ``DIR/epoch_NNN``, and resumes from the latest one there. Needs
scikit-learn (the digits ship with it: no download).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from polyak import EMA
from polyak.schedules import linear_warmup


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def shard(model: nn.Sequential) -> nn.Sequential:
    """FSDP2: each Linear its own unit, then the root. The EMA module must be sharded exactly like this too."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def digits(seed: int) -> tuple[TensorDataset, TensorDataset]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("this example needs scikit-learn: pip install scikit-learn") from e
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))  # the same on every rank
    test, train = order[:360], order[360:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: torch.dtype) -> float:
    """Accuracy over the whole test set; every rank takes part (an FSDP forward all-gathers the weights)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, device=device)
    for x, y in loader:
        x, y = x.to(device, dtype), y.to(device)
        counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    dist.all_reduce(counts)
    model.train(was_training)
    return (counts[0] / counts[1]).item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ema-momentum", type=float, default=0.02, help="after a warm-up from 0.5")
    parser.add_argument("--bf16", action="store_true", help="a bfloat16 model (the EMA keeps a float32 master)")
    parser.add_argument(
        "--checkpoint", type=Path, help="save into DIR/epoch_NNN after every epoch; resume from the latest"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = shard(make_model().to(device, dtype))
    # The EMA module: the same architecture, sharded the same way. Built on the meta device and then given
    # (uninitialised) memory, it never exists whole on a rank; EMA() starts it from the model's values.
    with torch.device("meta"):
        ema_module = shard(make_model().to(dtype))
    ema_module.to_empty(device=device)
    ema = EMA(model, schedule=linear_warmup(0.5, args.ema_momentum, 100), ema_model=ema_module)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    train_set, test_set = digits(args.seed)
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    test_sampler = DistributedSampler(test_set, num_replicas=world, rank=rank, shuffle=False)
    test_loader = DataLoader(test_set, batch_size=256, sampler=test_sampler)

    start = 0
    saved = sorted(args.checkpoint.glob("epoch_*/.metadata")) if args.checkpoint is not None else []
    if saved:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "ema": ema.state_dict(), "epoch": 0}
        dcp.load(state, checkpoint_id=saved[-1].parent)  # in place: each rank reads its own shards
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        ema.load_state_dict(state["ema"])
        start = state["epoch"]
        if rank == 0:
            print(f"resumed from {saved[-1].parent} ({ema.num_updates} EMA updates)")

    history = []
    for epoch in range(start + 1, args.epochs + 1):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, device=device)
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(model(x.to(device, dtype)).float(), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update()  # on the local shards only: no communication
            total += torch.stack([loss.detach() * len(y), torch.tensor(len(y), device=device)])
        dist.all_reduce(total)
        online_acc = evaluate(model, test_loader, device, dtype)
        ema_acc = evaluate(ema.ema_model, test_loader, device, dtype)
        history.append({"epoch": epoch, "loss": (total[0] / total[1]).item(), "online": online_acc, "ema": ema_acc})
        if rank == 0:
            print(
                f"epoch {epoch:2d}  loss {history[-1]['loss']:.4f}  "
                f"test accuracy: online {online_acc:.4f}  EMA {ema_acc:.4f}",
                flush=True,
            )
        if args.checkpoint is not None:
            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optim": optim_state, "ema": ema.state_dict(), "epoch": epoch}
            dcp.save(state, checkpoint_id=args.checkpoint / f"epoch_{epoch:03d}")  # each rank its own shards

    local = sum(p.to_local().numel() for p in ema.ema_model.parameters())
    full = sum(p.numel() for p in ema.ema_model.parameters())
    if rank == 0:
        print(f"EMA elements on rank 0: {local} of {full}; {ema}")
    dist.destroy_process_group()
    return {"history": history, "num_updates": ema.num_updates, "local": local, "full": full, "world": world}


if __name__ == "__main__":
    main()
