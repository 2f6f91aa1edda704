"""polyak.lightning with a real ``lightning.Trainer`` on the CPU, side by side with Lightning's own
``EMAWeightAveraging``: equal where Lightning is right, and the cases where it is wrong shown with numbers."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn

from _dist import run_program
from polyak.lightning import EMACallback, PostHocEMACallback
from polyak.posthoc import list_snapshots, synthesize

ROOT = Path(__file__).resolve().parents[1]


class Regressor(L.LightningModule):
    def __init__(self, bn: bool = False, lr: float = 0.05, fail_validation_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(4, 16)]
        if bn:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Linear(16, 1)]
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.fail_validation_at = fail_validation_at
        self.seen_in_validation: list[torch.Tensor] = []
        self.seen_in_test: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x).float() - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.net[0].weight.detach().clone())
        if self.fail_validation_at is not None and self.global_step >= self.fail_validation_at:
            raise RuntimeError("validation failed on purpose")
        x, y = batch
        loss = (self(x).float() - y).pow(2).mean()
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        self.seen_in_test.append(self.net[0].weight.detach().clone())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n: int = 64, batch_size: int = 8, seed: int = 1) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def trainer(callbacks, tmp_path: Path | None = None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread each (several threads on shared cores only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close_states(ours: dict, theirs: dict, **tol) -> None:
    for k, v in ours.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, theirs[k], msg=k, **tol)


# -- side by side with Lightning's EMAWeightAveraging ---------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "bn"),
    [
        (dict(decay=0.9), False),
        (dict(decay=0.9), True),
        (dict(decay=0.8, update_starting_at_step=5), False),
    ],
    ids=["plain", "batchnorm", "starting_at_step"],
)
def test_equal_to_lightnings_ema_where_it_is_right(kwargs: dict, bn: bool) -> None:
    theirs_model = Regressor(bn=bn)
    trainer([EMAWeightAveraging(**kwargs)]).fit(theirs_model, data())  # ends holding its average
    ours_model = Regressor(bn=bn)
    ours = EMACallback(weights_at_end="online", **kwargs)
    trainer([ours]).fit(ours_model, data())
    assert ours.ema.num_updates == (16 if "update_starting_at_step" not in kwargs else 11)
    averaged = ours.ema.ema_model.state_dict()
    assert_close_states(averaged, theirs_model.state_dict(), rtol=1e-5, atol=1e-6)
    # and the online weights, which both trained alike
    ours_online = Regressor(bn=bn)
    trainer([]).fit(ours_online, data())
    assert_close_states(ours_model.state_dict(), ours_online.state_dict(), rtol=0, atol=0)


def test_lightning_evaluates_a_never_updated_copy_and_polyak_does_not(caplog) -> None:
    """Lightning #21724: before its first update, validation swaps in the copy made at setup."""
    runs = {}
    for name, callback in (
        ("theirs", EMAWeightAveraging(decay=0.9, update_starting_at_step=100)),
        ("ours", EMACallback(decay=0.9, update_starting_at_step=100)),
        ("none", None),
    ):
        model = Regressor()
        with caplog.at_level(logging.INFO):
            trainer([callback] if callback else [], limit_val_batches=1, max_epochs=1).fit(model, data(), data(8))
        runs[name] = model.seen_in_validation[0]
    initial = Regressor().net[0].weight.detach()
    assert torch.equal(runs["theirs"], initial)  # it validated the untrained weights
    assert torch.equal(runs["ours"], runs["none"]) and not torch.equal(runs["ours"], initial)
    assert "no EMA update yet: this evaluation uses the online weights" in caplog.text


class Recorder(L.Callback):
    """The online weights after each optimizer step, in float64: what a reference EMA averages."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.net[0].weight.detach().double().clone())


def reference_ema(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    ema = weights[0].clone()  # the first update copies, in both libraries
    for w in weights[1:]:
        ema.mul_(decay).add_(w, alpha=1 - decay)
    return ema


def test_in_bf16_lightnings_ema_freezes_and_polyaks_moves() -> None:
    """``precision="bf16-true"``: Lightning's EMA, kept in bf16, rounds small updates of decay 0.999 away."""
    kwargs = dict(precision="bf16-true", max_epochs=4)
    theirs_model, ours_model, recorder = Regressor(lr=0.01), Regressor(lr=0.01), Recorder()
    trainer([EMAWeightAveraging(decay=0.999)], **kwargs).fit(theirs_model, data())
    ours = EMACallback(decay=0.999, weights_at_end="online")
    trainer([recorder, ours], **kwargs).fit(ours_model, data())
    reference = reference_ema(recorder.weights, 0.999)
    moved = (reference - recorder.weights[0]).abs().mean().item()  # what an exact EMA moved after its copy
    error_ours = (ours.ema.state_dict()["master"]["net.0.weight"].double() - reference).abs().mean().item()
    error_theirs = (theirs_model.net[0].weight.double() - reference).abs().mean().item()
    assert ours.ema.ema_model.net[0].weight.dtype == torch.bfloat16
    # measured: polyak 3e-8 (float32 rounding), Lightning 3.2e-4, 13% of the 2.4e-3 an exact EMA moved: the
    # updates that move a weight by less than half a bf16 unit are rounded away, and drop out of its average
    assert error_ours < 1e-4 * moved, (error_ours, moved)
    assert error_theirs > 0.05 * moved and error_theirs > 1000 * error_ours, (error_theirs, error_ours, moved)


def test_every_n_steps_is_compensated_lightnings_is_not() -> None:
    """Updating every 4 steps, polyak's EMA stays close to the every-step EMA; Lightning's averages 4x longer."""
    every = Regressor()
    reference = EMACallback(decay=0.95, weights_at_end="online")
    trainer([reference], max_epochs=4).fit(every, data())
    ours_model, theirs_model = Regressor(), Regressor()
    ours = EMACallback(decay=0.95, update_every_n_steps=4, weights_at_end="online")
    trainer([ours], max_epochs=4).fit(ours_model, data())
    trainer([EMAWeightAveraging(decay=0.95, update_every_n_steps=4)], max_epochs=4).fit(theirs_model, data())
    ref = reference.ema.ema_model.net[0].weight
    gap_ours = (ours.ema.ema_model.net[0].weight - ref).abs().max().item()
    gap_theirs = (theirs_model.net[0].weight - ref).abs().max().item()
    assert ours.ema.num_updates == 8
    assert gap_ours < gap_theirs / 3, (gap_ours, gap_theirs)


# -- once per optimizer step -------------------------------------------------------------------------------------
def test_updates_once_per_optimizer_step_under_gradient_accumulation() -> None:
    ema = EMACallback(decay=0.9)
    t = trainer([ema], accumulate_grad_batches=4)
    t.fit(Regressor(), data())
    assert t.global_step == 4 and ema.ema.num_updates == 4


class TwoOptimizers(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=0.05),
            torch.optim.SGD(self.net[2].parameters(), lr=0.05),
        )


def test_manual_optimization_with_two_optimizers_updates_once_per_batch() -> None:
    ema = EMACallback(decay=0.9)
    t = trainer([ema], max_epochs=1)
    t.fit(TwoOptimizers(), data())
    assert t.global_step == 16 and ema.ema.num_updates == 8  # global_step counts each optimizer's step


# -- evaluation with the EMA's weights -------------------------------------------------------------------------------
def test_validation_uses_the_ema_weights_and_restores_the_online_ones_bit_for_bit() -> None:
    model = Regressor()
    ema = EMACallback(decay=0.9, weights_at_end="online")
    trainer([ema], limit_val_batches=2, max_epochs=2).fit(model, data(), data(16))
    assert len(model.seen_in_validation) == 4
    assert torch.equal(model.seen_in_validation[-1], ema.ema.ema_model.net[0].weight)
    reference = Regressor()
    trainer([], max_epochs=2).fit(reference, data())
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k  # training never saw the EMA's weights


def test_a_failing_validation_leaves_the_online_weights() -> None:
    model = Regressor(fail_validation_at=8)
    ema = EMACallback(decay=0.9)
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer([ema], limit_val_batches=1, max_epochs=2).fit(model, data(), data(8))
    reference = Regressor()
    trainer([], max_epochs=1).fit(reference, data())
    assert torch.equal(model.net[0].weight, reference.net[0].weight)
    assert ema._swap is None


def test_test_and_predict_use_the_ema_and_switches_turn_it_off() -> None:
    model = Regressor()
    ema = EMACallback(decay=0.9, weights_at_end="online", predict=False)
    t = trainer([ema])
    t.fit(model, data())
    t.test(model, data(8), verbose=False)
    assert torch.equal(model.seen_in_test[-1], ema.ema.ema_model.net[0].weight)  # tested with the EMA
    online = model.net[0].weight.detach().clone()
    assert not torch.equal(online, ema.ema.ema_model.net[0].weight)
    predictions = t.predict(model, data(8))
    with torch.no_grad():
        assert torch.equal(predictions[0], model(data(8).dataset.tensors[0][:8]))  # predict=False: online
    assert torch.equal(model.net[0].weight, online)


@pytest.mark.parametrize("at_end", ["ema", "online"])
def test_what_the_module_holds_after_fit(at_end: str) -> None:
    model = Regressor()
    ema = EMACallback(decay=0.9, weights_at_end=at_end)
    trainer([ema]).fit(model, data())
    reference = Regressor()
    trainer([], max_epochs=2).fit(reference, data())
    expected = ema.ema.ema_model if at_end == "ema" else reference
    assert torch.equal(model.net[0].weight, expected.net[0].weight)


# -- checkpoints --------------------------------------------------------------------------------------------------
def test_checkpoint_holds_both_weight_sets_and_loads_with_weights_only(tmp_path: Path) -> None:
    model = Regressor()
    ema = EMACallback(decay=0.9, weights_at_end="online")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([ema, checkpoints], tmp_path, enable_checkpointing=True, max_epochs=1).fit(model, data())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, ema.ema.ema_model.state_dict()[k]), k
    for k, v in ckpt["current_model_state"].items():
        assert torch.equal(v, model.state_dict()[k]), k
    (state,) = [v for k, v in ckpt["callbacks"].items() if "EMACallback" in k]
    assert state["ema"]["num_updates"] == 8 and "ema_model" not in state["ema"]
    inference = Regressor()
    inference.load_state_dict(ckpt["state_dict"])  # the averaged model, with no polyak needed
    assert torch.equal(inference.net[0].weight, ema.ema.ema_model.net[0].weight)


@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path: Path, precision: str) -> None:
    kwargs = dict(precision=precision, max_epochs=4)
    full_model = Regressor()
    full = EMACallback(decay=0.95, update_every_n_steps=3, weights_at_end="online")
    trainer([full], **kwargs).fit(full_model, data())

    first = EMACallback(decay=0.95, update_every_n_steps=3, weights_at_end="online")
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([first, checkpoints], tmp_path, enable_checkpointing=True, **{**kwargs, "max_epochs": 2}).fit(
        Regressor(), data()
    )
    resumed_model = Regressor()
    resumed = EMACallback(decay=0.95, update_every_n_steps=3, weights_at_end="online")
    trainer([resumed], **kwargs).fit(resumed_model, data(), ckpt_path=str(tmp_path / "last.ckpt"))

    assert resumed.ema.num_updates == full.ema.num_updates
    for a, b in zip(
        resumed.ema.state_dict()["ema_model"].values(), full.ema.state_dict()["ema_model"].values(), strict=True
    ):
        assert torch.equal(a, b)
    if precision == "bf16-true":
        for k, v in resumed.ema.state_dict()["master"].items():
            assert torch.equal(v, full.ema.state_dict()["master"][k]), k
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, full_model.state_dict()[k]), k


def test_a_checkpoint_of_lightnings_ema_or_of_no_ema_is_taken_with_a_log_line(tmp_path: Path, caplog) -> None:
    theirs = EMAWeightAveraging(decay=0.9)
    trainer(
        [theirs, ModelCheckpoint(dirpath=tmp_path / "lightning", save_last=True)],
        tmp_path,
        enable_checkpointing=True,
        max_epochs=1,
    ).fit(Regressor(), data())
    trainer(
        [ModelCheckpoint(dirpath=tmp_path / "plain", save_last=True)], tmp_path, enable_checkpointing=True, max_epochs=1
    ).fit(Regressor(), data())
    lightning_ckpt = torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=False)
    for folder, expected_count, line in (
        ("lightning", 8, "written by Lightning's EMAWeightAveraging"),
        ("plain", 0, "holds no EMA"),
    ):
        ours = EMACallback(decay=0.9, weights_at_end="online")
        model = Regressor()
        with caplog.at_level(logging.INFO):
            trainer([ours], max_epochs=2).fit(model, data(), ckpt_path=str(tmp_path / folder / "last.ckpt"))
        assert line in caplog.text
        assert ours.ema.num_updates == expected_count + 8
    assert "current_model_state" in lightning_ckpt


# -- distributed -------------------------------------------------------------------------------------------------
DDP_SCRIPT = """
import sys, torch, lightning as L
from torch import nn
from polyak.lightning import EMACallback

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    def training_step(self, batch, batch_idx):
        return self.net(batch).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

if __name__ == "__main__":
    torch.manual_seed(0)
    ema = EMACallback(decay=0.9, weights_at_end="online")
    t = L.Trainer(accelerator="cpu", devices=2, strategy=sys.argv[2], max_epochs=1, logger=False, callbacks=[ema],
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = Net()
    t.fit(model, torch.utils.data.DataLoader(torch.randn(64, 4), batch_size=8))
    torch.save({"ema": ema.ema.ema_model.state_dict(), "online": model.state_dict(),
                "updates": ema.ema.num_updates}, f"{sys.argv[1]}/rank{t.global_rank}.pt")
"""


def run_two_ranks(tmp_path: Path, script: str, *args: str) -> None:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    run_program([sys.executable, str(path), str(tmp_path), *args], cwd=tmp_path)


def test_ddp_ranks_hold_the_same_ema(tmp_path: Path) -> None:
    run_two_ranks(tmp_path, DDP_SCRIPT, "ddp")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4  # 64 samples, 2 ranks, batches of 8
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(v, ranks[1]["ema"][k]), k
    assert not torch.equal(ranks[0]["ema"]["net.0.weight"], ranks[0]["online"]["net.0.weight"])


FSDP_SCRIPT = """
import sys, torch, lightning as L
from torch import nn
from torch.distributed.fsdp import fully_shard
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.callbacks import ModelCheckpoint
from polyak.lightning import EMACallback

class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)
    def training_step(self, batch, batch_idx): return self.net(batch).pow(2).mean()
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.1)

def build_ema(module):
    with torch.device("meta"):
        ema = Net()
    ema._device_mesh = module.device_mesh
    ema.configure_model()
    return ema.to_empty(device=module.device)

def run(out, epochs, save=False, resume=False):
    ema = EMACallback(decay=0.9, weights_at_end="online", ema_model=build_ema)
    callbacks = [ema] + ([ModelCheckpoint(dirpath=f"{out}/ckpt", save_last=True)] if save else [])
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    t = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs, logger=False,
                  callbacks=callbacks, enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False)
    model = Net()
    data = torch.utils.data.DataLoader(torch.randn(64, 4, generator=torch.Generator().manual_seed(1)), batch_size=8)
    t.fit(model, data, ckpt_path=f"{out}/ckpt/last.ckpt" if resume else None)
    whole = lambda sd: {k: v.full_tensor() for k, v in sd.items()}
    local = sum(p._local_tensor.numel() for p in ema.ema.ema_model.parameters())
    return t.global_rank, {"ema": whole(ema.ema.ema_model.state_dict()), "online": whole(model.state_dict()),
                           "updates": ema.ema.num_updates, "local": local}

if __name__ == "__main__":
    out = sys.argv[1]
    rank, full = run(out, 2)
    run(out, 1, save=True)
    _, resumed = run(out, 2, resume=True)
    torch.save({"full": full, "resumed": resumed}, f"{out}/rank{rank}.pt")
"""


def test_fsdp2_through_model_parallel_strategy_is_sharded_and_resumes_exactly(tmp_path: Path) -> None:
    """An uninterrupted run, a run stopped after one epoch with a (distributed) checkpoint, and its resumption."""
    run_two_ranks(tmp_path, FSDP_SCRIPT)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        full, resumed = rank["full"], rank["resumed"]
        assert full["updates"] == resumed["updates"] == 8  # 2 epochs of 4 steps (64 samples, 2 ranks, batch 8)
        for part in ("ema", "online"):
            for k, v in full[part].items():
                assert torch.equal(v, resumed[part][k]), (part, k)
        assert not torch.equal(full["ema"]["net.0.weight"], full["online"]["net.0.weight"])
        assert full["local"] < sum(v.numel() for v in full["ema"].values())  # each rank holds its shard only
    for k, v in ranks[0]["full"]["ema"].items():
        assert torch.equal(v, ranks[1]["full"]["ema"][k]), k


# -- post-hoc ------------------------------------------------------------------------------------------------------
def test_post_hoc_callback_writes_snapshots_and_resumes(tmp_path: Path) -> None:
    full = PostHocEMACallback(snapshot_every=4, directory=str(tmp_path / "full"))
    trainer([full], max_epochs=2).fit(Regressor(), data())
    assert [s.t for s in list_snapshots(tmp_path / "full")] == [4, 4, 8, 8, 12, 12, 16, 16]

    first = PostHocEMACallback(snapshot_every=4, directory=str(tmp_path / "split"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer([first, checkpoints], tmp_path, enable_checkpointing=True, max_epochs=1).fit(Regressor(), data())
    resumed = PostHocEMACallback(snapshot_every=4, directory=str(tmp_path / "split"))
    trainer([resumed], max_epochs=2).fit(Regressor(), data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.posthoc.run_id == first.posthoc.run_id
    a, b = synthesize(tmp_path / "full", 0.07), synthesize(tmp_path / "split", 0.07)
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_lightning_is_optional() -> None:
    code = "import sys; sys.modules['lightning'] = None\nimport polyak.lightning"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: polyak.lightning needs lightning, which is not installed: pip install 'polyak[lightning]'"
    )


def test_example_trains_and_the_ema_beats_the_online_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_ema", ROOT / "examples" / "lightning_ema.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.main(["--epochs", "2"])
    assert len(model.ema_accuracy) == len(model.online_accuracy) == 2
    assert model.ema_accuracy[-1] > 0.9 and model.ema_accuracy[-1] > model.online_accuracy[-1]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(handle_buffers="bogus"), ValueError, "handle_buffers must be one of"),
        (dict(dtype=torch.int8), TypeError, "dtype must be a floating"),
        (dict(compile=True), ValueError, "compile=True needs flat=True"),
        (dict(stochastic_rounding=True), ValueError, "stochastic_rounding needs a bfloat16 average"),
        (dict(include=3), TypeError, "include must be"),
        (dict(device="nope"), ValueError, "device must name a torch device"),
    ],
)
def test_bad_options_are_refused_when_the_callback_is_made(kwargs: dict, error: type, match: str) -> None:
    """As polyak.EMA refuses them, at construction, not when fit starts (they were accepted until then)."""
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)
