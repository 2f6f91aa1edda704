"""The two-process runs of tests/test_lightning_upstream.py (Lightning's ``test_ema_ddp_spawn_cpu`` and
``test_ema_resume_ddp``), in one launch: ``python -m torch.distributed.run --nproc_per_node=2 _lightning_ddp.py OUT``.

Each rank runs, under ``strategy="ddp"`` on CPU (gloo): a plain run without averaging; Lightning's
``EMAWeightAveraging`` and polyak's ``EMACallback`` over the whole run; and each of them crashed at epoch 3 and
resumed from its epoch-end checkpoint by a new module and a new callback. It saves what the test compares to
``OUT/rank{r}.pt``: the counts and global steps at each epoch's end, the online weights at the end of training, the
module's and the average's weights after fit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from polyak.lightning import EMACallback
from test_lightning_upstream import EPOCHS, Model, Online, Probe, average, count, loader

CRASH_ON_EPOCH = 3


def fit(model: Model, callback: L.Callback | None, root: Path, ckpt_path: str | None = None) -> dict:
    probe, online = Probe(callback), Online()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=EPOCHS,
        accumulate_grad_batches=2,
        callbacks=[online, *([callback] if callback is not None else []), probe],
        logger=False,
        enable_checkpointing=model.crash_on_epoch is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=str(root),
        deterministic=True,
    )
    try:
        trainer.fit(model, loader(), loader(), ckpt_path=ckpt_path)
    except RuntimeError as e:
        if model.crash_on_epoch is None or "CRASH" not in str(e):
            raise
        return {"crashed": True}
    result = {
        "counts": probe.counts,
        "online": online.state,
        "module": {k: v.clone() for k, v in model.state_dict().items()},
        "validated": len(model.validated),
    }
    if callback is not None:
        result["average"] = {k: v.clone() for k, v in average(callback).items()}
        result["count"] = count(callback)
    return result


def main(out: Path) -> None:
    torch.set_num_threads(1)
    runs: dict[str, dict] = {"plain": fit(Model(), None, out / "plain")}
    for name, make in (
        ("theirs", lambda: EMAWeightAveraging(decay=0.999)),
        ("ours", lambda: EMACallback(decay=0.999)),
    ):
        runs[name] = fit(Model(), make(), out / name)
        crashed = fit(Model(crash_on_epoch=CRASH_ON_EPOCH), make(), out / f"{name}_crashed")
        assert crashed == {"crashed": True}, crashed
        (path,) = (out / f"{name}_crashed" / "checkpoints").iterdir()
        runs[f"{name}_resumed"] = fit(Model(), make(), out / f"{name}_resumed", ckpt_path=str(path))
        runs[f"{name}_resumed"]["checkpoint"] = path.name
    rank = torch.distributed.get_rank()
    torch.save(runs, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
