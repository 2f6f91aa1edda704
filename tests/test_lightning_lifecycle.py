"""The run-lifecycle contract of ``polyak.lightning.EMACallback`` with a real ``lightning.Trainer``, table-driven.

A run writes a checkpoint at each point a Trainer writes one (every n steps, an epoch's end, inside a validation,
the end of fit (``last.ckpt``), on an exception or a KeyboardInterrupt, ``trainer.save_checkpoint`` by hand
after fit); each file is resumed the ways a user resumes (the same Trainer, a new one as a new process would,
the file moved elsewhere), and files of Lightning's ``EMAWeightAveraging`` or of no EMA too. Every cell checks,
with numbers, against an uninterrupted run or a float64 reference: the online weights are those of the same run
without any EMA callback (the EMA never changes them, and every file's ``current_model_state`` holds them), the
EMA is the uninterrupted one bit for bit where Lightning itself resumes exactly (at an epoch's end), else the
float64 EMA of the weights the run trained. Then: evaluation inside and outside fit, a second fit with the same
callback, two EMA callbacks, gradient accumulation and bf16.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn

from polyak.lightning import EMACallback

DECAY = 0.9
STEPS_PER_EPOCH = 8  # 32 samples, batches of 4


class Net(L.LightningModule):
    """A tiny regressor; ``fail_at``: raise (``RuntimeError`` or ``KeyboardInterrupt``) before that optimizer step."""

    def __init__(self, momentum: float = 0.9, fail_at: int | None = None, interrupt: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.momentum, self.fail_at, self.interrupt = momentum, fail_at, interrupt
        self.seen: dict[str, list[torch.Tensor]] = {"validate": [], "test": [], "predict": []}

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise KeyboardInterrupt if self.interrupt else RuntimeError("failed on purpose")
        x, y = batch
        return (self.net(x).float() - y).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["validate"].append(self.net[0].weight.detach().float().clone())
        x, y = batch
        self.log("val_loss", (self.net(x).float() - y).pow(2).mean())

    def test_step(self, batch, batch_idx):
        self.seen["test"].append(self.net[0].weight.detach().float().clone())

    def predict_step(self, batch, batch_idx):
        self.seen["predict"].append(self.net[0].weight.detach().float().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)


def data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Recorder(L.Callback):
    """The online weights (float64) after each optimizer step, by global step; the first in the callbacks list."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}
        self.last = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.last:  # an optimizer step (not a micro-batch that accumulated)
            self.last = trainer.global_step
            self.by_step[self.last] = {k: v.detach().double().clone() for k, v in pl_module.state_dict().items()}


def trainer(callbacks: list, root: Path | None = None, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root) if root else None,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread each (several threads on shared cores only wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_ema(trajectory: list[dict[str, torch.Tensor]], decay: float = DECAY) -> dict[str, torch.Tensor]:
    """The float64 EMA of a trajectory of online weights: the first update copies, as in both callbacks."""
    ema = {k: v.clone() for k, v in trajectory[0].items()}
    for weights in trajectory[1:]:
        for k, v in weights.items():
            ema[k].mul_(decay).add_(v, alpha=1 - decay)
    return ema


def assert_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].to(v.dtype)), (k, (v.double() - theirs[k].double()).abs().max().item())


def assert_close(ours: dict, theirs: dict, tol: float = 1e-6) -> None:
    for k, v in ours.items():
        gap = (v.double() - theirs[k].double()).abs().max().item()
        assert gap < tol, (k, gap)


def ema_of(callback: EMACallback) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in callback.ema.ema_model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted() -> dict:
    """4 epochs without interruption, with the EMA and without any EMA callback."""
    plain, model, recorder = Net(), Net(), Recorder()
    trainer([]).fit(plain, data())
    callback = EMACallback(decay=DECAY, weights_at_end="online")
    trainer([recorder, callback]).fit(model, data())
    assert_equal(model.state_dict(), plain.state_dict())  # the EMA never changed the online weights
    assert callback.ema.num_updates == 4 * STEPS_PER_EPOCH
    assert_close(ema_of(callback), reference_ema([recorder.by_step[k] for k in sorted(recorder.by_step)]))
    return {"online": plain.state_dict(), "ema": ema_of(callback), "trajectory": recorder.by_step}


# -- where a checkpoint is written -------------------------------------------------------------------------------
def write_every_n_steps(root: Path, callbacks: list) -> Path:
    saving = ModelCheckpoint(dirpath=root, every_n_train_steps=5, save_top_k=-1, filename="at-{step}")
    trainer([*callbacks, saving], root, max_epochs=1).fit(Net(), data())
    return root / "at-step=5.ckpt"


def write_epoch_end(root: Path, callbacks: list) -> Path:
    saving = ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="at-{epoch}")
    trainer([*callbacks, saving], root, max_epochs=2).fit(Net(), data())
    return root / "at-epoch=0.ckpt"


def write_in_validation(root: Path, callbacks: list) -> Path:
    """``trainer.save_checkpoint`` inside a validation (before the EMA's weights left the module)."""

    class SaveInValidation(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if trainer.global_step == STEPS_PER_EPOCH:
                trainer.save_checkpoint(root / "in-validation.ckpt")

    trainer([SaveInValidation(), *callbacks], root, max_epochs=2, limit_val_batches=1).fit(Net(), data(), data())
    return root / "in-validation.ckpt"


def write_before_the_ema_in_batch_end(root: Path, callbacks: list) -> Path:
    """``trainer.save_checkpoint`` in the ``on_train_batch_end`` of a callback listed before the EMA's: after the
    optimizer step, before the EMA averaged it (the file's EMA has one update less than its global step)."""

    class SaveFirst(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 5 and not (root / "before-the-ema.ckpt").exists():
                trainer.save_checkpoint(root / "before-the-ema.ckpt")

    trainer([SaveFirst(), *callbacks], root, max_epochs=1).fit(Net(), data())
    return root / "before-the-ema.ckpt"


def write_last_at_end(root: Path, callbacks: list) -> Path:
    saving = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    trainer([*callbacks, saving], root, max_epochs=2).fit(Net(), data())
    return root / "last.ckpt"


def write_by_hand_after_fit(root: Path, callbacks: list) -> Path:
    t = trainer(callbacks, root, max_epochs=2)
    t.fit(Net(), data())
    t.save_checkpoint(root / "by-hand.ckpt")
    return root / "by-hand.ckpt"


def _write_on(root: Path, callbacks: list, interrupt: bool) -> Path:
    saving = ModelCheckpoint(dirpath=root, save_on_exception=True, save_top_k=0, filename="on-exception")
    t = trainer([*callbacks, saving], root, max_epochs=2)
    previous = signal.getsignal(signal.SIGINT)
    try:  # a KeyboardInterrupt: Lightning shuts down (on_exception), then exits
        with pytest.raises(SystemExit if interrupt else RuntimeError):
            t.fit(Net(fail_at=6, interrupt=interrupt), data())
    finally:
        signal.signal(signal.SIGINT, previous)
    return root / "on-exception.ckpt"


def write_on_exception(root: Path, callbacks: list) -> Path:
    return _write_on(root, callbacks, interrupt=False)


def write_on_keyboard_interrupt(root: Path, callbacks: list) -> Path:
    return _write_on(root, callbacks, interrupt=True)


# (writer, step at which the file is written, whether Lightning resumes it exactly: at an epoch's end)
SAVE_POINTS: dict[str, tuple[Callable[[Path, list], Path], int, bool]] = {
    "every_n_steps": (write_every_n_steps, 5, False),
    "epoch_end": (write_epoch_end, 8, True),
    "in_validation": (write_in_validation, 8, False),  # Lightning trains 25 steps more: the epoch is not over
    "before_the_ema_in_batch_end": (write_before_the_ema_in_batch_end, 5, False),
    "last_at_end": (write_last_at_end, 16, True),
    "by_hand_after_fit": (write_by_hand_after_fit, 16, True),
    "on_exception": (write_on_exception, 6, False),
    "on_keyboard_interrupt": (write_on_keyboard_interrupt, 6, False),
}


def resume(how: str, path: Path, tmp_path: Path, first: tuple[L.Trainer, EMACallback, Net] | None = None):
    """Resume ``path`` for 4 epochs in all: ``how`` is "new_trainer", "moved" (the file elsewhere first) or
    "same_trainer" (the Trainer and callback of the first part, the same module)."""
    recorder = Recorder()
    if how == "same_trainer":
        assert first is not None
        t, callback, model = first
        t.callbacks.insert(0, recorder)
        t.fit_loop.max_epochs = 4
        t.fit(model, data(), ckpt_path=str(path))
        return model, callback, recorder
    if how == "moved":
        moved = tmp_path / "elsewhere" / "moved.ckpt"
        moved.parent.mkdir(parents=True)
        shutil.move(path, moved)
        path = moved
    model, callback = Net(), EMACallback(decay=DECAY, weights_at_end="online")
    trainer([recorder, callback]).fit(model, data(), ckpt_path=str(path))
    return model, callback, recorder


_PLAIN: dict[str, dict[str, torch.Tensor]] = {}


def plain_resumed(point: str, factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The online weights of the run written at ``point`` and resumed, without any EMA callback."""
    if point not in _PLAIN:
        write, _, _ = SAVE_POINTS[point]
        path = write(factory.mktemp(f"plain-{point}"), [])
        model = Net()
        trainer([]).fit(model, data(), ckpt_path=str(path))
        _PLAIN[point] = model.state_dict()
    return _PLAIN[point]


def run_cells(cells: dict[str, Callable[[], None]]) -> None:
    """Run every cell of a table; fail once, naming each cell that failed and how."""
    failed = {}
    for name, cell in cells.items():
        try:
            cell()
        except AssertionError as error:
            failed[name] = str(error).splitlines()[0][:300]
    assert not failed, failed


@pytest.mark.parametrize("how", ["new_trainer", "moved"])
def test_resume_from_every_checkpoint(
    how: str, tmp_path: Path, uninterrupted: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Each save point of SAVE_POINTS, resumed ``how``: a cell of the table each."""

    def cell(point: str) -> Callable[[], None]:
        return lambda: resume_cell(point, how, tmp_path / point, uninterrupted, tmp_path_factory)

    run_cells({point: cell(point) for point in SAVE_POINTS})


def resume_cell(
    point: str, how: str, tmp_path: Path, uninterrupted: dict, tmp_path_factory: pytest.TempPathFactory
) -> None:
    write, step, exact = SAVE_POINTS[point]
    first_recorder = Recorder()
    path = write(tmp_path, [first_recorder, EMACallback(decay=DECAY)])  # weights_at_end="ema", the default
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == step
    # the file: the true online weights and the true average, whatever hook wrote it
    online_then = first_recorder.by_step[step]
    assert_equal(ckpt["current_model_state"], online_then)
    averaged = step - 1 if point == "before_the_ema_in_batch_end" else step  # (the EMA of the steps it had seen)
    assert_close(ckpt["state_dict"], reference_ema([first_recorder.by_step[k] for k in range(1, averaged + 1)]))
    assert ckpt["averaging_state"]["n_averaged"] == averaged

    model, callback, recorder = resume(how, path, tmp_path)
    # the same run, interrupted and resumed at the same point without any EMA callback: the online weights are its
    assert_equal(model.state_dict(), plain_resumed(point, tmp_path_factory))
    assert sorted(recorder.by_step) == list(range(step + 1, step + len(recorder.by_step) + 1))
    assert callback.ema.num_updates == step + len(recorder.by_step)  # one update per optimizer step trained
    if exact:  # Lightning continues exactly: so does the EMA
        assert callback.ema.num_updates == 4 * STEPS_PER_EPOCH
        assert_equal(model.state_dict(), uninterrupted["online"])
        assert_equal(ema_of(callback), uninterrupted["ema"])
    else:  # mid-epoch, Lightning does not continue as the uninterrupted run: the EMA of what was trained
        trained = [first_recorder.by_step[k] for k in range(1, step + 1)]
        trained += [recorder.by_step[k] for k in sorted(recorder.by_step)]
        assert_close(ema_of(callback), reference_ema(trained))


@pytest.mark.parametrize("point", ["epoch_end", "last_at_end", "by_hand_after_fit"])
def test_resume_with_the_same_trainer_and_callback(point: str, tmp_path: Path, uninterrupted: dict) -> None:
    write, _, _ = SAVE_POINTS[point]
    kept: list = []

    class Keep(L.Callback):  # the first part's Trainer, module and callback, to fit again
        def on_fit_start(self, trainer, pl_module) -> None:
            kept[:] = [trainer, pl_module]

    callback = EMACallback(decay=DECAY)
    path = write(tmp_path, [Keep(), callback])
    t, model = kept
    model, callback, _ = resume("same_trainer", path, tmp_path, (t, callback, model))
    assert callback.ema.num_updates == 4 * STEPS_PER_EPOCH
    # the module holds the EMA at the end (weights_at_end="ema"): the online ones are in a last checkpoint
    assert_equal(model.state_dict(), uninterrupted["ema"])
    assert_equal(ema_of(callback), uninterrupted["ema"])
    t.save_checkpoint(tmp_path / "after.ckpt")
    assert_equal(torch.load(tmp_path / "after.ckpt", weights_only=True)["current_model_state"], uninterrupted["online"])
    with torch.no_grad():  # the user changes the module after fit: its weights are then the online ones
        model.net[0].weight.add_(1.0)
    t.save_checkpoint(tmp_path / "changed.ckpt")
    assert_equal(torch.load(tmp_path / "changed.ckpt", weights_only=True)["current_model_state"], model.state_dict())


def test_last_ckpt_at_the_end_of_fit_holds_the_online_weights_where_lightnings_does_not(tmp_path: Path) -> None:
    """Item 1 of issue 18, side by side: both callbacks copy the average into the module in ``on_train_end``,
    before ModelCheckpoint writes ``last.ckpt``; Lightning's file then calls the average the online weights, and a
    run resumed from it (with its own callback, 2 + 2 epochs) is not the uninterrupted one."""
    plain, plain_full = Net(), Net()
    trainer([], max_epochs=2).fit(plain, data())
    trainer([]).fit(plain_full, data())
    in_file, resumed = {}, {}
    for name, make in (("ours", lambda: EMACallback(decay=DECAY)), ("theirs", lambda: EMAWeightAveraging(decay=DECAY))):
        path = write_last_at_end(tmp_path / name, [make()])
        online = torch.load(path, weights_only=True)["current_model_state"]
        in_file[name] = max((v - plain.state_dict()[k]).abs().max().item() for k, v in online.items())
        kept = Recorder()  # the online weights at each step of the resumed run
        trainer([kept, make()]).fit(Net(), data(), ckpt_path=str(path))
        last = kept.by_step[max(kept.by_step)]
        resumed[name] = max((v - plain_full.state_dict()[k].double()).abs().max().item() for k, v in last.items())
    assert in_file["ours"] == 0.0 and resumed["ours"] == 0.0
    # measured: 0.66 in the file (the average, not the trained weights), 0.67 after the 2 resumed epochs
    assert in_file["theirs"] > 0.1 and resumed["theirs"] > 1e-2, (in_file, resumed)


# -- files of other writers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["lightning", "no_ema"])
def test_resume_from_a_file_without_polyaks_state(writer: str, tmp_path: Path, caplog) -> None:
    """A file of EMAWeightAveraging (its average and n_averaged start the EMA) or of no EMA (the EMA starts from
    its weights); under gradient accumulation the first micro-batch after the resume is not a step."""

    def cell(accumulate: int) -> Callable[[], None]:
        return lambda: foreign_file_cell(writer, accumulate, tmp_path / str(accumulate), caplog)

    run_cells({f"accumulate_grad_batches={a}": cell(a) for a in (1, 2)})


def foreign_file_cell(writer: str, accumulate: int, tmp_path: Path, caplog) -> None:
    steps_per_epoch = STEPS_PER_EPOCH // accumulate
    first = Recorder()
    callbacks = [first, EMAWeightAveraging(decay=DECAY)] if writer == "lightning" else [first]
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="at-{epoch}")
    trainer([*callbacks, saving], tmp_path, max_epochs=2, accumulate_grad_batches=accumulate).fit(Net(), data())
    path = tmp_path / "at-epoch=0.ckpt"
    recorder, callback, model = Recorder(), EMACallback(decay=DECAY, weights_at_end="online"), Net()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer([recorder, callback], accumulate_grad_batches=accumulate).fit(model, data(), ckpt_path=str(path))
    assert ("EMAWeightAveraging" if writer == "lightning" else "holds no EMA") in caplog.text
    later = [recorder.by_step[k] for k in sorted(recorder.by_step)]
    assert sorted(recorder.by_step) == list(range(steps_per_epoch + 1, 4 * steps_per_epoch + 1))
    if writer == "lightning":
        assert callback.ema.num_updates == 4 * steps_per_epoch  # its count went on
        start = torch.load(path, weights_only=False)["state_dict"]
        expected = reference_ema([{k: v.double() for k, v in start.items()}, *later])
    else:
        assert callback.ema.num_updates == 3 * steps_per_epoch  # counted from the resume
        expected = reference_ema(later)  # its first update copies
    assert_close(ema_of(callback), expected)


def test_a_run_switched_back_to_lightnings_callback_continues(tmp_path: Path) -> None:
    """Rolling back: EMAWeightAveraging resumes a file of EMACallback (its current_model_state, state_dict and
    averaging_state): the same as its own uninterrupted run."""
    theirs_full, full_callback = Net(), EMAWeightAveraging(decay=DECAY)
    trainer([full_callback]).fit(theirs_full, data())  # the module ends holding Lightning's average
    path = write_epoch_end(tmp_path, [EMACallback(decay=DECAY)])
    online = {}

    class Online(L.Callback):
        def on_train_end(self, trainer, pl_module) -> None:  # before EMAWeightAveraging copies its average in
            online.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    plain = Net()
    trainer([]).fit(plain, data())
    switched_back = Net()
    trainer([Online(), EMAWeightAveraging(decay=DECAY)]).fit(switched_back, data(), ckpt_path=str(path))
    assert_equal(online, plain.state_dict())  # without averaging_state it started from the average: 1e0 away
    assert_close(switched_back.state_dict(), theirs_full.state_dict(), tol=1e-6)  # lerp and mul-add: rounding


# -- evaluation inside and outside fit ---------------------------------------------------------------------------
def _fitted(tmp_path: Path, callback: L.Callback) -> tuple[L.Trainer, Net, Path]:
    model = Net()
    saving = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="at-{epoch}")
    t = trainer([callback, saving], tmp_path, max_epochs=2, limit_val_batches=1)
    t.fit(model, data(), data())
    return t, model, tmp_path / "at-epoch=0.ckpt"


STAGES = ("validate", "test", "predict")


def _evaluate(t: L.Trainer, model: Net, stage: str, ckpt_path: Path | None) -> torch.Tensor:
    model.seen[stage].clear()
    ckpt = None if ckpt_path is None else str(ckpt_path)
    if stage == "predict":
        t.predict(model, data(), ckpt_path=ckpt)
    else:
        getattr(t, stage)(model, data(), ckpt_path=ckpt, verbose=False)
    return model.seen[stage][0]


# how an evaluation is reached -> (what ours evaluates, what Lightning's evaluates, by stage). "ema_end": the
# average at the end of fit (ours: callback.ema.ema_model; both modules hold it after fit); "ema_file" and
# "online_file": the checkpoint's state_dict and current_model_state (epoch 0's, written during fit)
EVERYWHERE = dict.fromkeys(STAGES, "ema_file")
EVALUATIONS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "inside_fit": ({"validate": "ema_end"}, {"validate": "ema_end"}),
    "same_trainer": (dict.fromkeys(STAGES, "ema_end"), dict.fromkeys(STAGES, "ema_end")),
    "same_trainer_ckpt_path": (EVERYWHERE, {"validate": "ema_file", "test": "online_file", "predict": "online_file"}),
    "new_trainer_with_callback": (dict.fromkeys(STAGES, "ema_end"), dict.fromkeys(STAGES, "ema_end")),
    "new_trainer_with_callback_ckpt_path": (EVERYWHERE, EVERYWHERE),
    "new_trainer_without_callback": (dict.fromkeys(STAGES, "ema_end"), dict.fromkeys(STAGES, "ema_end")),
    "new_trainer_without_callback_ckpt_path": (EVERYWHERE, EVERYWHERE),
}


def test_what_each_evaluation_evaluates(tmp_path: Path) -> None:
    """What validation inside fit and ``validate``/``test``/``predict`` after it evaluate, each way a user reaches
    them (the table of docs/howto/lightning.md): ours the EMA's weights, those of the file with ``ckpt_path``;
    Lightning's callback beside: with the same Trainer and ``ckpt_path``, its test and predict run the file's
    online weights."""

    def cell(how: str) -> Callable[[], None]:
        return lambda: evaluation_cell(how, tmp_path / how)

    run_cells({how: cell(how) for how in EVALUATIONS})


def evaluation_cell(how: str, tmp_path: Path) -> None:
    for name, make in (("ours", lambda: EMACallback(decay=DECAY)), ("theirs", lambda: EMAWeightAveraging(decay=DECAY))):
        callback = make()
        t, model, path = _fitted(tmp_path / name, callback)
        ckpt = torch.load(path, weights_only=False)
        weights = {
            "ema_end": model.net[0].weight.detach().clone(),
            "ema_file": ckpt["state_dict"]["net.0.weight"],
            "online_file": ckpt["current_model_state"]["net.0.weight"],
        }
        if name == "ours":
            assert torch.equal(weights["ema_end"], callback.ema.ema_model.net[0].weight)
        assert not torch.equal(weights["ema_file"], weights["online_file"])
        expected = EVALUATIONS[how][0 if name == "ours" else 1]
        for stage, what in expected.items():
            if how == "inside_fit":
                seen = model.seen["validate"][-1]
            else:
                evaluator = t
                if how.startswith("new_trainer_with_callback"):
                    evaluator = trainer([make()], limit_val_batches=1)
                elif how.startswith("new_trainer_without_callback"):
                    evaluator = trainer([], limit_val_batches=1)
                seen = _evaluate(evaluator, model, stage, path if how.endswith("ckpt_path") else None)
            assert torch.equal(seen, weights[what]), (name, stage, what)


def test_the_modules_own_epoch_end_hooks_see_the_ema_too(tmp_path: Path) -> None:
    """Samples drawn or metrics computed from the model in the module's ``on_{validation,test,predict}_epoch_end``
    (Lightning calls it after the callbacks' hook of the same name) see the EMA's weights, as the steps do; the
    online weights are back after the loop."""

    class Sampling(Net):
        def __init__(self) -> None:
            super().__init__()
            self.at_end: dict[str, list[torch.Tensor]] = {"validate": [], "test": [], "predict": []}

        def on_validation_epoch_end(self) -> None:
            self.at_end["validate"].append(self.net[0].weight.detach().clone())

        def on_test_epoch_end(self) -> None:
            self.at_end["test"].append(self.net[0].weight.detach().clone())

        def on_predict_epoch_end(self) -> None:
            self.at_end["predict"].append(self.net[0].weight.detach().clone())

    model, callback = Sampling(), EMACallback(decay=DECAY, weights_at_end="online")
    t = trainer([callback], tmp_path, max_epochs=2, limit_val_batches=1)
    t.fit(model, data(), data())
    assert len(model.at_end["validate"]) == 2
    for step_saw, end_saw in zip(model.seen["validate"], model.at_end["validate"], strict=True):
        assert torch.equal(end_saw, step_saw)  # the EMA of that point
    online = model.net[0].weight.detach().clone()
    assert not torch.equal(model.at_end["validate"][-1], online)
    for stage in ("test", "predict"):
        _evaluate(t, model, stage, None)
        assert torch.equal(model.at_end[stage][-1], callback.ema.ema_model.net[0].weight), stage
        assert torch.equal(model.net[0].weight, online), stage  # back after the loop


def test_a_checkpoint_written_after_evaluating_another_holds_the_modules_weights_and_no_ema(
    tmp_path: Path, caplog
) -> None:
    """``trainer.test(ckpt_path=...)`` loads that file into the module; a ``trainer.save_checkpoint`` after it
    holds those weights and none of the callback's state (its EMA is of another run, at another step): resumed,
    the module trains on from those weights and a new EMA starts from them, as without any EMA callback."""
    callback = EMACallback(decay=DECAY)
    t, model, path = _fitted(tmp_path, callback)  # 2 epochs; path: epoch 0's file
    evaluated = torch.load(path, weights_only=True)
    _evaluate(t, model, "test", path)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        t.save_checkpoint(tmp_path / "after-test.ckpt")
    assert "holds the weights of the checkpoint it was evaluated from" in caplog.text
    after = torch.load(tmp_path / "after-test.ckpt", weights_only=True)
    assert callback.state_key not in after["callbacks"] and "current_model_state" not in after
    assert_equal(after["state_dict"], evaluated["state_dict"])  # the module's: the file evaluated
    recorder, resumed = Recorder(), EMACallback(decay=DECAY, weights_at_end="online")
    model = Net()
    trainer([recorder, resumed], max_epochs=3).fit(model, data(), ckpt_path=str(tmp_path / "after-test.ckpt"))
    steps = [recorder.by_step[k] for k in sorted(recorder.by_step)]
    assert len(steps) == STEPS_PER_EPOCH and resumed.ema.num_updates == len(steps)
    assert_close(ema_of(resumed), reference_ema(steps))  # a new EMA (its first update copies), of this run


def test_weights_only_checkpoints_are_said_to_hold_the_online_weights(tmp_path: Path) -> None:
    """``ModelCheckpoint(save_weights_only=True)``: Lightning calls no callback for those files, so they hold the
    module's own weights; said when fit starts, and true."""
    saving = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, every_n_epochs=1, save_top_k=-1, filename="w")
    recorder, callback = Recorder(), EMACallback(decay=DECAY)
    with pytest.warns(UserWarning, match=r"save_weights_only=True.*online"):
        trainer([recorder, callback, saving], tmp_path, max_epochs=1).fit(Net(), data())
    written = torch.load(tmp_path / "w.ckpt", weights_only=True)
    assert "callbacks" not in written
    assert_equal(written["state_dict"], recorder.by_step[STEPS_PER_EPOCH])


def test_evaluation_with_a_checkpoint_leaves_the_callbacks_ema_alone(tmp_path: Path) -> None:
    callback = EMACallback(decay=DECAY, weights_at_end="online")
    t, model, path = _fitted(tmp_path, callback)
    before, count = ema_of(callback), callback.ema.num_updates
    t.test(model, data(), ckpt_path=str(path), verbose=False)
    assert callback.ema.num_updates == count
    assert_equal(ema_of(callback), before)
    validate_online = EMACallback(decay=DECAY, validate=False)  # with validate=False: the file's online weights
    trainer([validate_online], limit_val_batches=1).validate(model, data(), ckpt_path=str(path), verbose=False)
    assert torch.equal(model.seen["validate"][-1], torch.load(path)["current_model_state"]["net.0.weight"])


def test_evaluation_without_any_ema_says_so(caplog) -> None:
    model = Net()
    with caplog.at_level(logging.INFO):
        trainer([EMACallback(decay=DECAY)], limit_val_batches=1).validate(model, data(), verbose=False)
    assert "holds no EMA of this module" in caplog.text
    assert torch.equal(model.seen["validate"][0], Net().net[0].weight)


# -- a second fit with the same callback ---------------------------------------------------------------------------
def test_a_second_fit_with_another_module_builds_a_new_ema() -> None:
    """Item 2 of issue 18: a callback reused in a sweep. Ours: the second module's EMA, as with a new callback;
    the first module is left alone."""
    callback = EMACallback(decay=DECAY)
    first = Net()
    trainer([callback], max_epochs=2).fit(first, data())
    first_after = {k: v.clone() for k, v in first.state_dict().items()}
    second, fresh_model, fresh = Net(momentum=0.0), Net(momentum=0.0), EMACallback(decay=DECAY)
    trainer([callback], max_epochs=1, limit_val_batches=1).fit(second, data(), data())
    trainer([fresh], max_epochs=1, limit_val_batches=1).fit(fresh_model, data(), data())
    assert callback.ema.model is second and callback.ema.num_updates == fresh.ema.num_updates == STEPS_PER_EPOCH
    assert_equal(ema_of(callback), ema_of(fresh))
    assert_equal(second.state_dict(), fresh_model.state_dict())  # the second module's own average at the end
    assert torch.equal(second.seen["validate"][0], fresh_model.seen["validate"][0])
    assert_equal(first.state_dict(), first_after)


@pytest.mark.parametrize("kwargs", [{}, dict(update_starting_at_epoch=0)], ids=["per_step", "and_epoch_ends"])
@pytest.mark.parametrize("same_trainer", [True, False])
def test_a_second_fit_of_the_same_module_continues(same_trainer: bool, kwargs: dict) -> None:
    """Fit 2 epochs, then 2 more with the same callback and module: ours continues the EMA and trains on from the
    online weights, as one 4-epoch run (plain SGD: a second fit builds a new optimizer). Lightning's builds a new
    average from the module, which holds its average: training goes on from the average; with a new Trainer, whose
    global_step starts again at 0, it does not update at all in the second fit."""
    full_model, full = Net(momentum=0.0), EMACallback(decay=DECAY, **kwargs)
    trainer([full]).fit(full_model, data())
    plain = Net(momentum=0.0)
    trainer([]).fit(plain, data())
    finals = {}
    for name, callback in (
        ("ours", EMACallback(decay=DECAY, **kwargs)),
        ("theirs", EMAWeightAveraging(decay=DECAY, **kwargs)),
    ):
        model, online = Net(momentum=0.0), {}

        class Online(L.Callback):
            def __init__(self, into: dict) -> None:
                self.into = into

            def on_train_end(self, trainer, pl_module) -> None:  # before the callback copies its average in
                self.into.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        t = trainer([Online(online), callback], max_epochs=2)
        t.fit(model, data())
        after_first = {k: v.clone() for k, v in model.state_dict().items()}
        if same_trainer:
            t.fit_loop.max_epochs = 4
        else:
            t = trainer([Online(online), callback], max_epochs=2)
        t.fit(model, data())
        finals[name] = (after_first, online, model.state_dict())
    _, online, final = finals["ours"]
    assert_equal(online, plain.state_dict())
    assert_equal(final, full_model.state_dict())  # the module holds the 4-epoch EMA
    assert full.ema.num_updates == 4 * STEPS_PER_EPOCH + (4 if kwargs else 0)
    after_first, online, final = finals["theirs"]
    gap_online = max((v - plain.state_dict()[k]).abs().max().item() for k, v in online.items())
    assert gap_online > 1e-2, gap_online  # it trained on from its average
    if not same_trainer:  # no update in the second fit: it ends with the average of the first
        assert_equal(final, after_first)


# -- two EMA callbacks -----------------------------------------------------------------------------------------------
def test_two_ema_callbacks_nest_and_save_apart(tmp_path: Path) -> None:
    """Two momenta in one Trainer: the first evaluates and writes state_dict, the second keeps its weights in its
    own state; each is the EMA of a run with it alone, and a resume restores both exactly."""
    alone = {}
    for decay in (0.9, 0.99):
        callback = EMACallback(decay=decay, weights_at_end="online")
        trainer([callback]).fit(Net(), data())
        alone[decay] = ema_of(callback)

    def pair() -> list[EMACallback]:
        return [
            EMACallback(decay=0.9, weights_at_end="online"),
            EMACallback(decay=0.99, validate=False, test=False, predict=False, weights_at_end="online"),
        ]

    both = pair()
    path = write_epoch_end(tmp_path, both)
    ckpt = torch.load(path, weights_only=True)
    keys = sorted(k for k in ckpt["callbacks"] if k.startswith("EMACallback"))
    assert keys == [c.state_key for c in sorted(both, key=lambda c: c.state_key)] and len(set(keys)) == 2
    second_state = ckpt["callbacks"][both[1].state_key]["ema"]
    assert "ema_model" in second_state and "ema_model" not in ckpt["callbacks"][both[0].state_key]["ema"]
    resumed = pair()
    trainer(resumed).fit(Net(), data(), ckpt_path=str(path))
    assert_equal(ema_of(resumed[0]), alone[0.9])
    assert_equal(ema_of(resumed[1]), alone[0.99])

    # a file of the first alone, resumed with both: the second's EMA starts at the resume, from the online weights
    single = write_epoch_end(tmp_path / "single", [EMACallback(decay=0.9)])
    recorder, resumed = Recorder(), pair()
    trainer([recorder, *resumed]).fit(Net(), data(), ckpt_path=str(single))
    assert_equal(ema_of(resumed[0]), alone[0.9])
    assert resumed[1].ema.num_updates == 3 * STEPS_PER_EPOCH
    assert_close(ema_of(resumed[1]), reference_ema([recorder.by_step[k] for k in sorted(recorder.by_step)], 0.99))

    # a file of polyak before state keys (its state under "EMACallback"): taken by the one EMACallback
    old = torch.load(single, weights_only=True)
    old["callbacks"] = {("EMACallback" if k.startswith("EMACallback") else k): v for k, v in old["callbacks"].items()}
    torch.save(old, tmp_path / "old.ckpt")
    callback = EMACallback(decay=0.9, weights_at_end="online")
    trainer([callback]).fit(Net(), data(), ckpt_path=str(tmp_path / "old.ckpt"))
    assert_equal(ema_of(callback), alone[0.9])


def test_two_ema_callbacks_that_would_both_swap_are_refused() -> None:
    with pytest.raises(ValueError, match=r"second EMACallback.*validate=False, test=False, predict=False"):
        trainer([EMACallback(decay=0.9), EMACallback(decay=0.99)]).fit(Net(), data())
    with pytest.raises(
        RuntimeError, match="must be unique among all callbacks"
    ):  # the same momentum twice: Lightning's
        trainer([EMACallback(decay=0.9), EMACallback(decay=0.9, validate=False, weights_at_end="online")])


# -- precision and accumulation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [dict(precision="bf16-true"), dict(precision="bf16-mixed"), dict(accumulate_grad_batches=2)],
    ids=["bf16-true", "bf16-mixed", "accumulate2"],
)
def test_resume_is_exact_in_bf16_and_under_accumulation(kwargs: dict, tmp_path: Path) -> None:
    full_model, full = Net(), EMACallback(decay=DECAY)
    trainer([full], **kwargs).fit(full_model, data())

    def cell(point: str) -> Callable[[], None]:
        return lambda: precision_cell(point, kwargs, tmp_path / point, full_model, full)

    run_cells({point: cell(point) for point in ("epoch_end", "last_at_end")})


def precision_cell(point: str, kwargs: dict, tmp_path: Path, full_model: Net, full: EMACallback) -> None:
    saving = (
        ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="at-{epoch}")
        if point == "epoch_end"
        else ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    )
    trainer([EMACallback(decay=DECAY), saving], tmp_path, max_epochs=2, **kwargs).fit(Net(), data())
    path = tmp_path / ("at-epoch=0.ckpt" if point == "epoch_end" else "last.ckpt")
    model, callback = Net(), EMACallback(decay=DECAY)
    trainer([callback], **kwargs).fit(model, data(), ckpt_path=str(path))
    assert callback.ema.num_updates == full.ema.num_updates
    assert_equal(model.state_dict(), full_model.state_dict())  # both modules hold the EMA's weights at the end
    assert_equal(callback.ema.state_dict().get("master", {}), full.ema.state_dict().get("master", {}))


# -- arguments -------------------------------------------------------------------------------------------------------
def test_ema_model_must_be_a_callable_that_builds_the_module() -> None:
    with pytest.raises(TypeError, match=r"ema_model must be a callable pl_module -> module .* got Net"):
        EMACallback(ema_model=Net())
    with pytest.raises(TypeError, match="ema_model must return the EMA module.*got str"):
        trainer([EMACallback(ema_model=lambda module: "not a module")]).fit(Net(), data())
