"""The run-lifecycle contract of the ignite handler and the diffusers drop-in: train, save, resume, evaluate, reuse.

Each row of the tables below (docs/howto/ignite.md and docs/howto/diffusers.md, "Checkpoints and resume") is
one test: a run stopped where a checkpoint was written, resumed from it with new objects (as a new process
builds them), from a file moved elsewhere, from a file written by the library polyak replaces, from a file
without the EMA. Each asserts against the uninterrupted run (bit for bit where polyak wrote the file) or a
float64 reference EMA of the online weights the run recorded, and that the online weights are those of a run
without any EMA. Then the EMA is evaluated and the run goes on (reuse).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel as DiffusersEMAModel
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from ignite.handlers import EMAHandler as IgniteEMAHandler
from torch import nn

from polyak import EMAHandler
from polyak.diffusers import EMAModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as under ``make test``'s workers: tiny models on two busy threads run ~25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- ignite ----------------------------------------------------------------------------------------------------------
EPOCH, EPOCHS = 6, 4  # 24 iterations; the warm-up spans 12 updates
WARMUP = dict(momentum=0.05, momentum_warmup=0.5, warmup_iters=12)


class Crash(RuntimeError):
    pass


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, generator=g) for _ in range(EPOCH)]


def ignite_run(
    directory: Path | None = None,
    *,
    cls: type = EMAHandler,
    save: str | None = None,
    stop: int | None = None,
    resume: Path | None = None,
    to_load: str = "handler",
    max_epochs: int = EPOCHS,
    ema: bool = True,
):
    """One training run: the EMA on every iteration; a Checkpoint ``save`` ("every_5", "epoch" or "exception"),
    the run stopped at iteration ``stop``; or resumed from ``resume`` with ``to_load`` ("handler": the handler
    itself, "ema_model": ignite's flow, "none": a checkpoint without the EMA). Returns (handler, trainer, model,
    online weights after each iteration in float64, momenta used, the checkpoint written)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(engine, _):
        # the batch of each iteration (not the data's position: ignite's Engine resumed mid-epoch starts the
        # data over, its DeterministicEngine saves numpy RNG states that weights_only=True refuses)
        batch = torch.randn(8, 3, generator=torch.Generator().manual_seed(engine.state.iteration))
        model.train()
        optimizer.zero_grad()
        (model(batch) - batch[:, :1]).pow(2).mean().backward()
        optimizer.step()

    trainer = Engine(step)
    handler = cls(model, **WARMUP, handle_buffers="update") if ema else None
    if handler is not None:
        handler.attach(trainer, warn_if_exists=False)
    online: list[dict[str, torch.Tensor]] = []
    momenta: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _(engine):
        online.append(
            {
                k: v.detach().clone().double() if v.is_floating_point() else v.clone()
                for k, v in model.state_dict().items()
            }
        )
        if handler is not None:
            momenta.append(engine.state.ema_momentum)

    to_save: dict = {"model": model, "optimizer": optimizer, "trainer": trainer}
    if handler is not None and to_load != "none":
        to_save[to_load if to_load == "ema_model" else "ema"] = handler.ema_model if to_load == "ema_model" else handler
    saver = Checkpoint(to_save, DiskSaver(directory, require_empty=False), n_saved=None) if directory else None
    if save == "every_5":
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=5), saver)
    elif save == "epoch":
        trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
    elif save == "exception":

        def save_and_raise(engine, e):  # ignite's pattern: a handler of EXCEPTION_RAISED raises it on
            saver(engine)
            raise e

        trainer.add_event_handler(Events.EXCEPTION_RAISED, save_and_raise)
    if stop is not None:
        if save == "exception":  # a handler after the update fails (a watchdog): the iteration is complete

            def crash(engine):
                raise Crash(f"iteration {engine.state.iteration}")

            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop), crash)
        elif save == "epoch":
            trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop // EPOCH), lambda e: e.terminate())
        else:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop), lambda e: e.terminate())
    if resume is not None:
        Checkpoint.load_objects(to_load=to_save, checkpoint=str(resume))  # torch.load(weights_only=True)
    with contextlib.suppress(Crash):
        trainer.run(batches(), max_epochs=max_epochs)
    written = Path(directory) / saver.last_checkpoint if saver is not None and saver.last_checkpoint else None
    return handler, trainer, model, online, momenta, written


def reference(start: dict[str, torch.Tensor], online: list[dict[str, torch.Tensor]], momenta: list[float]) -> dict:
    ema = dict(start)
    for w, m in zip(online, momenta, strict=True):
        ema = {k: v.lerp(w[k], m) if v.is_floating_point() else w[k] for k, v in ema.items()}
    return ema


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted():
    handler, _, model, online, momenta, _ = ignite_run()
    plain = ignite_run(ema=False)[2]
    assert_equal(model.state_dict(), plain.state_dict())  # the EMA never changes the online weights
    return handler, model, online, momenta


@pytest.fixture(scope="module")
def longer():
    """The uninterrupted run, two epochs longer: what reusing a resumed run's objects must give."""
    return ignite_run(max_epochs=EPOCHS + 2)[0]


IGNITE_CELLS = [
    # (how the checkpoint is written, where the run stops, how it is resumed)
    ("every_5", 10, "new objects"),
    ("every_5", 10, "moved elsewhere"),
    ("epoch", 12, "new objects"),
    ("epoch", 12, "moved elsewhere"),
    ("exception", 15, "new objects"),
    ("exception", 15, "moved elsewhere"),
]


@pytest.mark.parametrize(("save", "stop", "resume"), IGNITE_CELLS, ids=[f"{s}-{r}" for s, _, r in IGNITE_CELLS])
def test_ignite_resumes_bit_for_bit(tmp_path: Path, uninterrupted, longer, save: str, stop: int, resume: str) -> None:
    full, full_model, full_online, full_momenta = uninterrupted
    _, _, _, first_online, first_momenta, ckpt = ignite_run(tmp_path / "run", save=save, stop=stop)
    assert ckpt is not None and len(first_online) == stop
    if resume == "moved elsewhere":
        moved = tmp_path / "elsewhere" / "renamed.pt"
        moved.parent.mkdir()
        shutil.move(ckpt, moved)
        shutil.rmtree(tmp_path / "run")
        ckpt = moved
    handler, trainer, model, online, momenta, _ = ignite_run(tmp_path / "resumed", resume=ckpt)
    assert first_momenta + momenta == full_momenta  # the warm-up went on where it stopped
    assert_equal(handler.ema_model.state_dict(), full.ema_model.state_dict())
    assert_equal(model.state_dict(), full_model.state_dict())
    for a, b in zip(first_online + online, full_online, strict=True):
        assert_equal(a, b)
    # evaluate, then reuse: two more epochs on the same objects, as two more on the uninterrupted run's
    online_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = batches()[0]
    evaluator = Engine(lambda e, b: handler.ema_model(b))
    out = evaluator.run([x], max_epochs=1).output
    with handler.swapped() as swapped:
        assert torch.equal(swapped.eval()(x), out)
    swapped.train()
    assert_equal(model.state_dict(), online_before)
    trainer.run(batches(), max_epochs=EPOCHS + 2)
    assert handler.ema.num_updates == (EPOCHS + 2) * EPOCH
    assert_equal(handler.ema_model.state_dict(), longer.ema_model.state_dict())


def test_ignite_written_checkpoint_resumes_on_polyak_as_on_ignite(tmp_path: Path) -> None:
    """ignite's own flow (to_save with ``ema_model``; ignite's handler has no state): resumed on polyak's handler it
    continues as ignite's does (its warm-up restarts: the count was never in the file), to float32 rounding."""
    _, _, _, _, _, ckpt = ignite_run(
        tmp_path / "ignite", cls=IgniteEMAHandler, save="epoch", stop=12, to_load="ema_model"
    )
    ours, _, ours_model, _, ours_m, _ = ignite_run(tmp_path / "a", resume=ckpt, to_load="ema_model")
    theirs, _, theirs_model, _, theirs_m, _ = ignite_run(
        tmp_path / "b", cls=IgniteEMAHandler, resume=ckpt, to_load="ema_model"
    )
    assert ours_m == theirs_m and ours_m[0] == WARMUP["momentum_warmup"]
    assert_equal(ours_model.state_dict(), theirs_model.state_dict())
    for (k, a), b in zip(ours.ema_model.state_dict().items(), theirs.ema_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_ignite_checkpoint_without_the_ema_restarts_it_from_the_loaded_model(tmp_path: Path, uninterrupted) -> None:
    """A checkpoint of model, optimizer and trainer only (the EMA added later, or left out): the EMA would average
    the loaded model into the weights it was built from (ignite's does). polyak's restarts from the loaded
    weights, with a warning, and its warm-up restarts."""
    _, full_model, full_online, _ = uninterrupted
    _, _, _, _, _, ckpt = ignite_run(tmp_path / "run", save="epoch", stop=12, to_load="none")
    with pytest.warns(UserWarning, match="resumes at iteration 12 but the EMA was not loaded"):
        handler, _, model, online, momenta, _ = ignite_run(tmp_path / "resumed", resume=ckpt, to_load="none")
    assert momenta[0] == WARMUP["momentum_warmup"] and len(online) == 12
    expected = reference(full_online[11], online, momenta)
    got = handler.ema_model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-5, atol=1e-6, msg=k)
    assert_equal(model.state_dict(), full_model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ignite_run(tmp_path / "ignite", cls=IgniteEMAHandler, resume=ckpt, to_load="none")[0]
    stale = max(
        (a.double() - expected[k].double()).abs().max().item()
        for k, a in theirs.ema_model.state_dict().items()
        if a.is_floating_point()
    )
    assert stale > 1e-2, stale  # ignite's: the initial weights averaged in


# -- diffusers -------------------------------------------------------------------------------------------------------
UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)
STEPS, HALF = 8, 4
DECAY = dict(decay=0.9, use_ema_warmup=True, power=3 / 4)


def diffusers_run(cls=EMAModel, *, start: int = 0, stop: int = STEPS, ema=True, resume=None, dtype=torch.float32):
    """diffusers' training loop: ``resume(unet, optimizer, ema)`` loads a checkpoint first; steps ``start..stop``.
    Returns (ema, unet, optimizer, online parameters after each step in float64)."""
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET).to(dtype)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    ema_model = cls(unet.parameters(), **DECAY, model_cls=UNet2DModel, model_config=unet.config) if ema else None
    if resume is not None:
        resume(unet, optimizer, ema_model)
    online = []
    for k in range(start, stop):
        g = torch.Generator().manual_seed(k)
        clean, noise = torch.randn(2, 1, 8, 8, generator=g).to(dtype), torch.randn(2, 1, 8, 8, generator=g).to(dtype)
        loss = (unet(clean + noise, k).sample.float() - noise.float()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if ema_model is not None:
            ema_model.step(unet.parameters())
        online.append([p.detach().double().clone() for p in unet.parameters()])
    return ema_model, unet, optimizer, online


def save_pretrained_and_state(directory: Path, unet, optimizer, ema) -> None:
    """diffusers' scripts: ``ema.save_pretrained(out / "unet_ema")`` in the save hook; the model and optimizer
    beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ema.save_pretrained(directory / "unet_ema")
    torch.save({"unet": unet.state_dict(), "optimizer": optimizer.state_dict()}, directory / "training.pt")


def load_pretrained_and_state(directory: Path):
    def load(unet, optimizer, ema) -> None:
        state = torch.load(directory / "training.pt", weights_only=True)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        if (directory / "unet_ema").exists():  # the scripts' load hook: from_pretrained, then load_state_dict
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = type(ema).from_pretrained(directory / "unet_ema", UNet2DModel)
            ema.load_state_dict(loaded.state_dict())

    return load


def save_state_dict(directory: Path, unet, optimizer, ema) -> None:
    torch.save(
        {"unet": unet.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict()}, directory / "all.pt"
    )


def load_state_dict(directory: Path):
    def load(unet, optimizer, ema) -> None:
        state = torch.load(directory / "all.pt", weights_only=True)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])

    return load


def accelerate_save(directory: Path, unet, optimizer, ema) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(ema)
    accelerator.save_state(str(directory / "state"))


def accelerate_load(directory: Path):
    def load(unet, optimizer, ema) -> None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        accelerator.prepare(unet, optimizer)
        accelerator.register_for_checkpointing(ema)
        accelerator.load_state(str(directory / "state"))

    return load


DIFFUSERS_CELLS = {
    "save_pretrained": (save_pretrained_and_state, load_pretrained_and_state),
    "state_dict": (save_state_dict, load_state_dict),
    "accelerate": (accelerate_save, accelerate_load),
}


@pytest.fixture(scope="module")
def diffusers_full():
    ema, unet, _, online = diffusers_run()
    plain = diffusers_run(ema=False)[1]
    for a, b in zip(unet.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # the EMA never changes the online weights
    return ema, unet, online


@pytest.mark.parametrize("resume", ["new objects", "moved elsewhere", "written by diffusers"])
@pytest.mark.parametrize("how", list(DIFFUSERS_CELLS))
def test_diffusers_resumes(tmp_path: Path, diffusers_full, how: str, resume: str) -> None:
    full, full_unet, full_online = diffusers_full
    save, load = DIFFUSERS_CELLS[how]
    writer = DiffusersEMAModel if resume == "written by diffusers" else EMAModel
    ema, unet, optimizer, _ = diffusers_run(writer, stop=HALF)
    (tmp_path / "run").mkdir()
    save(tmp_path / "run", unet, optimizer, ema)
    directory = tmp_path / "run"
    if resume == "moved elsewhere":
        shutil.move(directory, tmp_path / "elsewhere")
        directory = tmp_path / "elsewhere"
    resumed, resumed_unet, _, online = diffusers_run(start=HALF, resume=load(directory))
    assert resumed.optimization_step == full.optimization_step == STEPS
    assert resumed.cur_decay_value == full.cur_decay_value
    for a, b in zip(resumed_unet.parameters(), full_unet.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(online, full_online[HALF:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for a, b in zip(resumed.shadow_params, full.shadow_params, strict=True):
        if writer is EMAModel:
            assert torch.equal(a, b)  # polyak's file: bit for bit
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # diffusers' first half: its rounding
    # evaluate (store, copy_to, ..., restore), then reuse: two more steps, as the same EMA taking them
    before = [p.detach().clone() for p in resumed_unet.parameters()]
    resumed.store(resumed_unet.parameters())
    resumed.copy_to(resumed_unet.parameters())
    for p, s in zip(resumed_unet.parameters(), resumed.shadow_params, strict=True):
        assert torch.equal(p, s)
    resumed.restore(resumed_unet.parameters())
    for p, b in zip(resumed_unet.parameters(), before, strict=True):
        assert torch.equal(p, b)
    with torch.no_grad():
        for p in resumed_unet.parameters():
            p.add_(0.01)
    resumed.step(resumed_unet.parameters())
    d = resumed.get_decay(STEPS + 1)
    for s, f, p in zip(resumed.shadow_params, full.shadow_params, resumed_unet.parameters(), strict=True):
        torch.testing.assert_close(s.double(), d * f.double() + (1 - d) * p.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", list(DIFFUSERS_CELLS))
def test_diffusers_bf16_resumes_bit_for_bit_with_its_float32_masters(tmp_path: Path, how: str) -> None:
    """bf16: the average is kept in float32 masters; each way of saving carries them (``save_pretrained``: in
    ``polyak_master.safetensors`` beside the model), so the resumed run's bf16 shadows are the uninterrupted run's."""
    full = diffusers_run(dtype=torch.bfloat16)[0]
    save, load = DIFFUSERS_CELLS[how]
    ema, unet, optimizer, _ = diffusers_run(stop=HALF, dtype=torch.bfloat16)
    (tmp_path / "run").mkdir()
    save(tmp_path / "run", unet, optimizer, ema)
    resumed = diffusers_run(start=HALF, resume=load(tmp_path / "run"), dtype=torch.bfloat16)[0]
    for a, b in zip(resumed.shadow_params, full.shadow_params, strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    masters = resumed.ema.state_dict()["master"]
    for k, v in full.ema.state_dict()["master"].items():
        assert torch.equal(masters[k], v), k


def test_diffusers_checkpoint_without_the_ema_restarts_it_at_the_first_step(tmp_path: Path, diffusers_full) -> None:
    """A folder without ``unet_ema`` (the EMA added later): the EMA was built from the model before it was
    loaded, and its first step copies (decay 0 at step 1, as diffusers'), so it starts from the loaded run's
    weights, its warm-up from the start: the float64 EMA of the online weights from the resume on."""
    _, full_unet, _ = diffusers_full
    _, unet, optimizer, _ = diffusers_run(stop=HALF, ema=False)
    (tmp_path / "run").mkdir()
    torch.save({"unet": unet.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "run" / "training.pt")
    resumed, resumed_unet, _, online = diffusers_run(start=HALF, resume=load_pretrained_and_state(tmp_path / "run"))
    assert resumed.optimization_step == STEPS - HALF
    expected = [t.clone() for t in online[0]]
    for k, w in enumerate(online[1:], start=2):
        d = resumed.get_decay(k)
        expected = [d * e + (1 - d) * x for e, x in zip(expected, w, strict=True)]
    for s, e in zip(resumed.shadow_params, expected, strict=True):
        torch.testing.assert_close(s.double(), e, rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed_unet.parameters(), full_unet.parameters(), strict=True):
        assert torch.equal(a, b)
