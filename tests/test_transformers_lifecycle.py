"""The run-lifecycle contract of polyak.transformers.EMACallback, with the real ``transformers.Trainer``.

Each cell of the table (docs/howto/transformers.md, "Checkpoints and resume") is one test: train, with a
checkpoint at every point the Trainer writes one; resume from each (the same output folder, a new Trainer
and callback as a new process has, a checkpoint moved elsewhere, a checkpoint without the EMA's file);
evaluate inside ``train()`` and outside; train again with the same callback; two callbacks; accumulation
and bf16. Each asserts against an uninterrupted run (bit for bit) or a float64 reference EMA of the online
weights the run recorded, and that the online weights are those of a run without any EMA.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_model
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

from polyak.transformers import WEIGHTS_NAME, EMACallback
from test_transformers import Tokens, arguments, gpt2

M = 0.1  # decay 0.9


class Recorder(TrainerCallback):
    """The online parameters (float64) at the start and after each optimizer step, and those evaluated."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.after_step: list[dict[str, torch.Tensor]] = []
        self.evaluated: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = params(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(params(model))

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if not self.evaluated or self.evaluated[-1][0] != state.global_step:
            self.evaluated.append((state.global_step, params(model)))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().double().clone() for k, v in model.named_parameters()}


def reference(start: dict[str, torch.Tensor], steps: list[dict[str, torch.Tensor]], m: float = M) -> dict:
    """The EMA in float64 of the online weights after each step."""
    ema = dict(start)
    for w in steps:
        ema = {k: v.lerp(w[k], m) for k, v in ema.items()}
    return ema


def close(ema: torch.nn.Module, expected: dict[str, torch.Tensor], **tolerance) -> None:
    got = params(ema)
    assert got.keys() == expected.keys()
    for k, v in got.items():
        torch.testing.assert_close(v, expected[k], **tolerance, msg=k)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Stop(TrainerCallback):
    """Ends the run after ``at`` steps, as a job that was stopped (the learning-rate schedule is that of 8)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


def run(out: Path, *callbacks: TrainerCallback, model=None, resume=None, stop=None, eval_dataset=None, **kwargs):
    recorder = Recorder()
    trainer = Trainer(
        model=gpt2() if model is None else model,
        args=arguments(out, **kwargs),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8) if eval_dataset is None else eval_dataset,
        callbacks=[recorder, *callbacks] + ([Stop(stop)] if stop else []),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def ema_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata of an EMA file, and its weights by parameter name (loaded into a model, as users do)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    model = gpt2()
    load_model(model, str(path))
    return metadata, params(model)


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The online weights after 8 steps of a run without any EMA (with evaluations every 4 steps)."""
    trainer, _ = run(tmp_path_factory.mktemp("plain"), save_strategy="no", eval_strategy="steps", eval_steps=4)
    return params(trainer.model)


# -- where checkpoints are written ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "when, kwargs, steps",
    [
        ("save_steps", dict(save_steps=3, max_steps=7), [3, 6, 7]),  # and the end of training
        ("epoch", dict(save_strategy="epoch", max_steps=-1, num_train_epochs=2), [8, 16]),
    ],
)
def test_every_checkpoint_holds_the_ema_of_its_step(tmp_path: Path, when: str, kwargs: dict, steps: list) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    _, recorder = run(tmp_path, callback, **kwargs)
    written = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    assert written == steps
    for step in steps:
        metadata, tensors = ema_file(tmp_path / f"checkpoint-{step}" / WEIGHTS_NAME)
        assert metadata["num_updates"] == str(step)
        expected = reference(recorder.start, recorder.after_step[:step])
        for k, v in expected.items():
            torch.testing.assert_close(tensors[k], v, msg=k)


def test_save_model_writes_the_online_weights_and_save_writes_the_ema_beside(tmp_path: Path) -> None:
    callback = EMACallback(decay=0.9)
    trainer, recorder = run(tmp_path / "out", callback, save_strategy="no", max_steps=4)
    trainer.save_model(str(tmp_path / "model"))
    assert not (tmp_path / "model" / WEIGHTS_NAME).exists()  # no callback event: documented
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "model")
    equal(params(saved), recorder.after_step[-1])
    callback.save(tmp_path / "model")
    _, tensors = ema_file(tmp_path / "model" / WEIGHTS_NAME)
    expected = reference(recorder.start, recorder.after_step)
    for k, v in expected.items():
        torch.testing.assert_close(tensors[k], v, msg=k)
    close(GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "ema"), expected)  # final_dir at the end


class Fail(TrainerCallback):
    """Raises in the first evaluation after step ``at``, as a metric that fails would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            raise RuntimeError("boom")


def test_an_exception_in_an_evaluation_keeps_the_checkpoints_and_restore_gives_the_online_weights_back(
    tmp_path: Path,
) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    recorder = Recorder()
    model = gpt2()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, eval_strategy="steps", eval_steps=3, save_steps=2),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8),
        callbacks=[recorder, callback, Fail(6)],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # none at 6
    close(model, reference(recorder.start, recorder.after_step))  # the model holds the EMA: no event to leave it
    callback.restore()
    equal(params(model), recorder.after_step[-1])
    callback.restore()  # twice: nothing
    equal(params(model), recorder.after_step[-1])


# -- resuming ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    """An uninterrupted run of 8 steps, checkpoints at 4 and 8."""
    callback = EMACallback(decay=0.9, final_dir=None)
    out = tmp_path_factory.mktemp("full")
    _, recorder = run(out, callback)
    return out, callback.ema.state_dict(), recorder


@pytest.mark.parametrize("where", ["same folder", "last checkpoint (True)", "moved elsewhere"])
def test_resuming_continues_exactly(tmp_path: Path, full, where: str) -> None:
    out, state, _ = full
    split = tmp_path / "split"
    first = EMACallback(decay=0.9, final_dir=None)
    run(split, first, stop=4)
    resume: str | bool = str(split / "checkpoint-4")
    if where == "last checkpoint (True)":
        resume = True
    if where == "moved elsewhere":  # a copied checkpoint, and a new output folder
        shutil.copytree(split / "checkpoint-4", tmp_path / "copied")
        shutil.rmtree(split)
        resume, split = str(tmp_path / "copied"), tmp_path / "new"
    resumed = EMACallback(decay=0.9, final_dir=None)  # a new process: a new model, Trainer and callback
    run(split, resumed, resume=resume)
    assert resumed.ema.num_updates == 8
    equal(resumed.ema.state_dict()["ema_model"], state["ema_model"])
    _, tensors = ema_file(split / "checkpoint-8" / WEIGHTS_NAME)
    equal(tensors, ema_file(out / "checkpoint-8" / WEIGHTS_NAME)[1])


def test_a_checkpoint_without_the_ema_restarts_it_from_the_model_with_a_warning(
    tmp_path: Path, full, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, recorder = full
    run(tmp_path, EMACallback(decay=0.9, final_dir=None), stop=4)
    (tmp_path / "checkpoint-4" / WEIGHTS_NAME).unlink()
    resumed = EMACallback(decay=0.9, final_dir=None)
    with caplog.at_level(logging.WARNING, logger="polyak.transformers"):
        run(tmp_path, resumed, resume=str(tmp_path / "checkpoint-4"))
    assert f"{tmp_path / 'checkpoint-4' / WEIGHTS_NAME} does not exist" in caplog.text
    assert resumed.ema.num_updates == 4
    close(resumed.ema.ema_model, reference(recorder.after_step[3], recorder.after_step[4:]))


def test_a_checkpoint_elsewhere_is_taken_over_the_output_folders_one(tmp_path: Path, full) -> None:
    """The output folder has a checkpoint-4 of another run: the EMA comes from the folder resumed from."""
    _, state, _ = full
    run(tmp_path / "a", EMACallback(decay=0.9, final_dir=None), stop=4)
    run(tmp_path / "b", EMACallback(decay=0.5, final_dir=None), stop=4)  # another EMA, same step
    resumed = EMACallback(decay=0.9, final_dir=None)
    run(tmp_path / "b", resumed, resume=str(tmp_path / "a" / "checkpoint-4"))
    equal(resumed.ema.state_dict()["ema_model"], state["ema_model"])


# -- evaluation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_evaluations_in_train_see_the_ema_and_the_online_weights_are_untouched(
    tmp_path: Path, online, strategy: str
) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    if strategy == "steps":
        trainer, recorder = run(tmp_path, callback, save_strategy="no", eval_strategy="steps", eval_steps=4)
        assert [s for s, _ in recorder.evaluated] == [4, 8]
        equal(params(trainer.model), online)
    else:
        trainer, recorder = run(tmp_path, callback, save_strategy="no", eval_strategy="epoch", max_steps=16)
        assert [s for s, _ in recorder.evaluated] == [8, 16]
    for step, seen in recorder.evaluated:
        for k, v in reference(recorder.start, recorder.after_step[:step]).items():
            torch.testing.assert_close(seen[k], v, msg=k)
    equal(params(trainer.model), recorder.after_step[-1])


def test_evaluate_outside_train_sees_the_online_weights_and_swapped_the_ema(tmp_path: Path) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    trainer, recorder = run(tmp_path, callback, save_strategy="no", max_steps=4)
    trainer.evaluate()
    equal(recorder.evaluated[-1][1], recorder.after_step[-1])  # documented: the model's own weights
    recorder.evaluated.clear()
    with callback.ema.swapped():
        trainer.evaluate()
    close_to = reference(recorder.start, recorder.after_step)
    for k, v in close_to.items():
        torch.testing.assert_close(recorder.evaluated[-1][1][k], v, msg=k)
    equal(params(trainer.model), recorder.after_step[-1])


class Batches(TrainerCallback):
    """The parameters (float64) in the model at every evaluated batch, with the step, and raises at the
    ``fail``-th batch of the evaluations after step ``at``, if given."""

    def __init__(self, at: int | None = None, fail: int = 0) -> None:
        self.seen: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.at, self.fail = at, fail

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.seen.append((state.global_step, params(model)))
        if self.at is not None and sum(s >= self.at for s, _ in self.seen) == self.fail:
            raise RuntimeError("boom")


def two_datasets() -> dict[str, Tokens]:
    return {"a": Tokens(8), "b": Tokens(16)}  # one batch of 8, then two


def test_every_dataset_of_a_dict_is_evaluated_with_the_ema_and_the_checkpoints_hold_the_online_weights(
    tmp_path: Path,
) -> None:
    """The Trainer evaluates a dict of datasets one by one, each ending in on_evaluate; the checkpoint of the
    step is written right after the last one (before on_save)."""
    kwargs = dict(eval_strategy="steps", eval_steps=4, metric_for_best_model="eval_b_loss")
    # without any EMA: each evaluation's dataloader draws from the global RNG, so the run of one dataset differs
    plain, _ = run(tmp_path / "plain", eval_dataset=two_datasets(), **kwargs)
    online = params(plain.model)
    callback = EMACallback(decay=0.9, final_dir=None)
    batches = Batches()
    trainer, recorder = run(tmp_path, callback, batches, eval_dataset=two_datasets(), **kwargs)
    assert [s for s, _ in batches.seen] == [4, 4, 4, 8, 8, 8]  # a, then b's two batches, at each step
    for step, seen in batches.seen:
        for k, v in reference(recorder.start, recorder.after_step[:step]).items():
            torch.testing.assert_close(seen[k], v, msg=k)
    for step in (4, 8):
        folder = tmp_path / f"checkpoint-{step}"
        equal(params(GPT2LMHeadModel.from_pretrained(folder)), recorder.after_step[step - 1])  # bit for bit
        _, tensors = ema_file(folder / WEIGHTS_NAME)
        for k, v in reference(recorder.start, recorder.after_step[:step]).items():
            torch.testing.assert_close(tensors[k], v, msg=k)
    equal(params(trainer.model), online)  # training never saw the EMA
    equal(params(trainer.model), recorder.after_step[-1])
    logged = {n: [h for h in trainer.state.log_history if f"eval_{n}_loss" in h] for n in "ab"}
    assert [[h["step"] for h in logged[n]] for n in "ab"] == [[4, 8], [4, 8]]
    with callback.ema.swapped():  # the metrics the best checkpoint is chosen by are the EMA's
        again = trainer.evaluate(eval_dataset=two_datasets())
    for n in "ab":
        assert again[f"eval_{n}_loss"] == pytest.approx(logged[n][-1][f"eval_{n}_loss"], rel=1e-6)
    assert trainer.state.best_metric == min(h["eval_b_loss"] for h in logged["b"])
    equal(params(trainer.model), recorder.after_step[-1])

    batches.seen.clear()  # outside train(): the online weights, every dataset, and nothing left swapped
    trainer.evaluate()
    assert len(batches.seen) == 3
    for _, seen in batches.seen:
        equal(seen, recorder.after_step[-1])
    equal(params(trainer.model), recorder.after_step[-1])


def test_an_exception_in_the_second_dataset_leaves_the_ema_for_restore(tmp_path: Path) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    recorder, batches, model = Recorder(), Batches(at=4, fail=2), gpt2()  # raises at b's first batch of step 4
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, eval_strategy="steps", eval_steps=4, save_steps=2),
        train_dataset=Tokens(),
        eval_dataset=two_datasets(),
        callbacks=[recorder, callback, batches],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert [s for s, _ in batches.seen] == [4, 4]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # none at 4
    close(model, reference(recorder.start, recorder.after_step))  # b was being evaluated with the EMA
    callback.restore()
    equal(params(model), recorder.after_step[-1])


# -- the callback again ----------------------------------------------------------------------------------------------
def other_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(5)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=40, n_positions=16))


@pytest.mark.parametrize("again", ["another model", "the same model"])
def test_a_second_train_builds_a_new_ema_of_the_model_it_trains(tmp_path: Path, again: str) -> None:
    callback = EMACallback(decay=0.9, final_dir=None)
    first, _ = run(tmp_path / "1", callback, save_strategy="no", max_steps=4)
    earlier = callback.ema
    model = other_gpt2() if again == "another model" else first.model
    _, recorder = run(tmp_path / "2", callback, model=model, save_strategy="no", max_steps=4)
    assert callback.ema is not earlier and callback.ema.num_updates == 4
    close(callback.ema.ema_model, reference(recorder.start, recorder.after_step))
    equal(params(model), recorder.after_step[-1])


# -- two callbacks ----------------------------------------------------------------------------------------------------
def two() -> tuple[EMACallback, EMACallback]:
    return EMACallback(decay=0.9, name="fast"), EMACallback(decay=0.5, name="slow", evaluate=False)


def test_two_callbacks_average_the_online_weights_apart_and_one_evaluates(tmp_path: Path, online) -> None:
    fast, slow = two()
    trainer, recorder = run(tmp_path, fast, slow, eval_strategy="steps", eval_steps=4)
    equal(params(trainer.model), online)  # the run itself is that without any EMA
    close(fast.ema.ema_model, reference(recorder.start, recorder.after_step, 0.1))
    close(slow.ema.ema_model, reference(recorder.start, recorder.after_step, 0.5))
    for step, seen in recorder.evaluated:
        for k, v in reference(recorder.start, recorder.after_step[:step], 0.1).items():
            torch.testing.assert_close(seen[k], v, msg=k)
    for step in (4, 8):
        for callback, m in ((fast, 0.1), (slow, 0.5)):
            _, tensors = ema_file(tmp_path / f"checkpoint-{step}" / callback.weights_name)
            for k, v in reference(recorder.start, recorder.after_step[:step], m).items():
                torch.testing.assert_close(tensors[k], v, msg=k)
    assert (tmp_path / "ema-fast" / "model.safetensors").is_file()
    assert (tmp_path / "ema-slow" / "model.safetensors").is_file()


def test_two_callbacks_resume_each_its_own(tmp_path: Path) -> None:
    full = two()
    run(tmp_path / "full", *full, eval_strategy="steps", eval_steps=4)
    run(tmp_path / "split", *two(), eval_strategy="steps", eval_steps=4, stop=4)
    resumed = two()
    run(tmp_path / "split", *resumed, eval_strategy="steps", eval_steps=4, resume=True)
    for a, b in zip(resumed, full, strict=True):
        assert a.ema.num_updates == 8
        equal(a.ema.state_dict()["ema_model"], b.ema.state_dict()["ema_model"])


@pytest.mark.parametrize(
    "pair, match",
    [
        ((dict(decay=0.9), dict(decay=0.5, evaluate=False)), "write ema.safetensors: give each its own name="),
        ((dict(decay=0.9, name="a"), dict(decay=0.5, name="b")), "two EMACallbacks evaluate"),
        ((dict(name="a", final_dir="x"), dict(name="b", final_dir="x", evaluate=False)), "final_dir='x'"),
    ],
)
def test_two_callbacks_that_would_collide_are_refused_before_a_step(tmp_path: Path, pair, match: str) -> None:
    model = gpt2()
    before = params(model)
    with pytest.raises(ValueError, match=match):
        run(tmp_path, *(EMACallback(**kw) for kw in pair), model=model)
    equal(params(model), before)
    assert not list(tmp_path.glob("checkpoint-*"))


# -- accumulation and bf16 --------------------------------------------------------------------------------------------
def test_accumulation_and_bf16_autocast_follow_the_reference_and_resume_exactly(tmp_path: Path) -> None:
    kwargs = dict(gradient_accumulation_steps=2, bf16=True)
    full = EMACallback(decay=0.9, final_dir=None)
    _, recorder = run(tmp_path / "full", full, **kwargs)
    assert full.ema.num_updates == len(recorder.after_step) == 8  # one update per optimizer step
    close(full.ema.ema_model, reference(recorder.start, recorder.after_step))
    run(tmp_path / "split", EMACallback(decay=0.9, final_dir=None), stop=4, **kwargs)
    resumed = EMACallback(decay=0.9, final_dir=None)
    run(tmp_path / "split", resumed, resume=True, **kwargs)
    equal(resumed.ema.state_dict()["ema_model"], full.ema.state_dict()["ema_model"])


# -- a hyperparameter search ------------------------------------------------------------------------------------------
class Trials(TrainerCallback):
    """Each trial's online parameters at its start and after each of its optimizer steps."""

    def __init__(self) -> None:
        self.runs: list[tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.runs.append((params(model), []))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.runs[-1][1].append(params(model))


def test_a_hyperparameter_search_writes_each_trials_ema_into_the_trials_folder(tmp_path: Path) -> None:
    """``Trainer.hyperparameter_search`` (optuna) writes each trial's checkpoints into ``output_dir/run-<n>``; each
    trial's EMA goes beside them (its checkpoint and its ``final_dir``), the EMA of that trial's online weights,
    and nothing into ``output_dir`` itself, where trials would overwrite each other."""
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials, callback = Trials(), EMACallback(decay=0.9)
    trainer = Trainer(
        model_init=lambda trial: gpt2(),
        args=arguments(tmp_path, max_steps=4),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8),
        callbacks=[trials, callback],
    )
    trainer.hyperparameter_search(
        direction="minimize",
        backend="optuna",
        n_trials=2,
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-0", "run-1"]
    assert len(trials.runs) == 2
    for n, (start, steps) in enumerate(trials.runs):
        expected = reference(start, steps)
        metadata, tensors = ema_file(tmp_path / f"run-{n}" / "checkpoint-4" / WEIGHTS_NAME)
        assert metadata["num_updates"] == "4"
        for k, v in expected.items():
            torch.testing.assert_close(tensors[k], v, msg=k)
        final = GPT2LMHeadModel.from_pretrained(tmp_path / f"run-{n}" / "ema")
        close(final, expected)
    assert gap_of(trials.runs[0][1][-1], trials.runs[1][1][-1]) > 1e-4  # two trials that trained apart


def gap_of(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((v - b[k]).abs().max().item() for k, v in a.items())


def test_load_best_model_at_end_takes_the_best_checkpoints_ema_too(tmp_path: Path) -> None:
    """``load_best_model_at_end=True``: the Trainer puts the best checkpoint's online weights into the model; the
    callback takes that checkpoint's EMA (the one evaluated, whose metric chose it), and final_dir holds it."""
    callback = EMACallback(decay=0.9)
    kwargs = dict(eval_strategy="steps", eval_steps=4, save_steps=4, max_steps=8, load_best_model_at_end=True)
    # the highest loss is the best: the first evaluation's, so that the best is not the last checkpoint
    trainer, recorder = run(tmp_path, callback, metric_for_best_model="loss", greater_is_better=True, **kwargs)
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-4"
    equal(params(trainer.model), recorder.after_step[3])  # the Trainer's part
    _, best = ema_file(tmp_path / "checkpoint-4" / WEIGHTS_NAME)
    equal(params(callback.ema.ema_model), best)
    assert callback.ema.num_updates == 4
    close(callback.ema.ema_model, reference(recorder.start, recorder.after_step[:4]))
    equal(params(GPT2LMHeadModel.from_pretrained(tmp_path / "ema")), best)
