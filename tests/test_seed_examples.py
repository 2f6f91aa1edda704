"""The three examples of ignite's EMAHandler page, run as written with only their typos fixed.

Fixes: ``{"model": model, "ema_model", ema_model, ...}`` -> a dict; ``@trainer.on(...):`` -> no colon; the
unclosed ``print(``; ``engine.run(val_data_loader)`` inside ``run_validation`` -> ``evaluator.run`` (as
written it would restart the trainer from inside itself); ``"dis_ema_momentum"`` ->
``"disc_ema_momentum"`` (the name the example then reads); ``cuda:0`` -> the CPU when there is no GPU.
The ``...`` placeholders are filled with small, real objects.
"""

from __future__ import annotations

import itertools

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from polyak import EMAHandler

device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 2, generator=g)
        out.append((x.to(device), (x.sum(1, keepdim=True) * 0.5).to(device)))
    return out


def get_train_step_fn(model: nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step_fn(engine, batch):
        x, y = batch
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return train_step_fn


def get_val_step_fn(model: nn.Module):
    def val_step_fn(engine, batch):
        x, y = batch
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    return val_step_fn


def example_one(resume_from, dirname, capsys_lines: list[str], max_epochs: int):
    """The first example, verbatim but for the fixes in the module docstring."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(device)
    # update the ema every 5 iterations
    ema_handler = EMAHandler(model, momentum=0.0002)
    # get the ema model, which is an instance of nn.Module
    ema_model = ema_handler.ema_model
    trainer = Engine(get_train_step_fn(model))
    to_load = {"model": model, "ema_model": ema_model, "trainer": trainer}
    if resume_from is not None:
        Checkpoint.load_objects(to_load, checkpoint=resume_from)

    # update the EMA model every 5 iterations
    ema_handler.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED(every=5))

    # add other handlers
    to_save = to_load
    ckpt_handler = Checkpoint(to_save, DiskSaver(dirname, require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt_handler)

    # current momentum can be retrieved from engine.state,
    # the attribute name is the `name` parameter used in the attach function
    @trainer.on(Events.ITERATION_COMPLETED)
    def print_ema_momentum(engine):
        capsys_lines.append(f"current momentum: {engine.state.ema_momentum}")

    # use ema model for validation
    val_step_fn = get_val_step_fn(ema_model)
    evaluator = Engine(val_step_fn)
    val_data_loader = batches(3, seed=1)

    @trainer.on(Events.EPOCH_COMPLETED)
    def run_validation(engine):
        evaluator.run(val_data_loader)

    trainer.run(batches(10), max_epochs=max_epochs)
    return model, ema_handler, trainer, evaluator, ckpt_handler


def test_example_one_runs_and_resumes(tmp_path, monkeypatch):
    lines: list[str] = []
    model, handler, _, evaluator, ckpt = example_one(None, tmp_path, lines, max_epochs=2)
    assert lines == ["current momentum: 0.0002"] * 20
    assert handler.ema.num_updates == 4  # every 5 of 20 iterations
    assert evaluator.state.iteration == 3
    saved_ema = {k: v.clone() for k, v in handler.ema_model.state_dict().items()}
    assert not torch.equal(saved_ema["weight"], model.weight)

    last = tmp_path / ckpt.last_checkpoint
    lines.clear()
    captured = {}

    # resume: load before attach, as the page recommends, and check what was restored
    def spy_attach(self, engine, *args, **kwargs):
        captured["ema"] = {k: v.clone() for k, v in self.ema_model.state_dict().items()}
        captured["iteration"] = engine.state.iteration
        return original_attach(self, engine, *args, **kwargs)

    original_attach = EMAHandler.attach
    monkeypatch.setattr(EMAHandler, "attach", spy_attach)
    _, handler2, trainer2, _, _ = example_one(str(last), tmp_path, lines, max_epochs=3)
    for k, v in saved_ema.items():
        assert torch.equal(captured["ema"][k], v), k
    assert captured["iteration"] == 20
    assert trainer2.state.epoch == 3 and len(lines) == 10
    assert handler2.ema.num_updates == 2  # the page's flow restores weights only; see test_resume.py


def test_example_two_warmup():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(device)
    # linearly change the EMA momentum from 0.2 to 0.002 in the first 100 iterations,
    # then keep a constant EMA momentum of 0.002 afterwards
    ema_handler = EMAHandler(model, momentum=0.002, momentum_warmup=0.2, warmup_iters=100)
    engine = Engine(get_train_step_fn(model))
    ema_handler.attach(engine, name="ema_momentum")
    seen: list[float] = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.ema_momentum))
    engine.run(batches(50), max_epochs=3)
    assert seen[0] == 0.2
    assert abs(seen[1] - (0.2 - 0.198 / 99)) < 1e-15
    assert abs(seen[99] - 0.002) < 1e-15 and seen[100:] == [0.002] * 50
    assert all(a > b for a, b in itertools.pairwise(seen[:100]))


def test_example_three_two_handlers(capsys):
    def build_generator():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))

    def build_discriminator():
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(2, 4), nn.LeakyReLU(0.2), nn.Linear(4, 1))

    def get_step_fn(generator, discriminator):
        opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
        bce = nn.BCEWithLogitsLoss()

        def step(engine, real):
            z = torch.randn_like(real)
            fake = generator(z)
            opt_d.zero_grad()
            d_loss = bce(discriminator(real), torch.ones(len(real), 1)) + bce(
                discriminator(fake.detach()), torch.zeros(len(real), 1)
            )
            d_loss.backward()
            opt_d.step()
            opt_g.zero_grad()
            g_loss = bce(discriminator(fake), torch.ones(len(real), 1))
            g_loss.backward()
            opt_g.step()
            return g_loss.item(), d_loss.item()

        return step

    generator = build_generator()
    discriminator = build_discriminator()

    gen_handler = EMAHandler(generator)
    disc_handler = EMAHandler(discriminator)

    step_fn = get_step_fn(generator, discriminator)
    engine = Engine(step_fn)

    # update EMA model of generator every 1 iteration
    gen_handler.attach(engine, "gen_ema_momentum", event=Events.ITERATION_COMPLETED)
    # update EMA model of discriminator every 2 iteration
    disc_handler.attach(engine, "disc_ema_momentum", event=Events.ITERATION_COMPLETED(every=2))

    @engine.on(Events.ITERATION_COMPLETED)
    def print_ema_momentum(engine):
        print(f"current momentum for generator: {engine.state.gen_ema_momentum}")
        print(f"current momentum for discriminator: {engine.state.disc_ema_momentum}")

    engine.run([torch.randn(16, 2) * 0.5 + 2 for _ in range(6)], max_epochs=1)
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["current momentum for generator: 0.0002", "current momentum for discriminator: 0.0002"]
    assert len(out) == 12
    assert gen_handler.ema.num_updates == 6 and disc_handler.ema.num_updates == 3
    for ema_p, p in zip(gen_handler.ema_model.parameters(), generator.parameters(), strict=True):
        assert not torch.equal(ema_p, p)  # averaged, not copied
