"""polyak.transformers.EMACallback with a real ``transformers.Trainer`` on a tiny GPT-2 built from a config
(nothing downloaded), and polyak's EMA checkpointed by Accelerate."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from _dist import free_port, run_program
from polyak import EMA
from polyak.posthoc import PostHocEMA
from polyak.transformers import MASTERS_NAME, WEIGHTS_NAME, EMACallback

warnings.filterwarnings("ignore", category=FutureWarning)


def gpt2(dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    return GPT2LMHeadModel(config).to(dtype)  # tied weights: lm_head is wte


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 40, (n, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """The model's weights after each optimizer step, and what evaluations saw."""

    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []
        self.in_evaluation: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if len(self.after_step) < state.global_step:
            self.after_step.append(model.transformer.h[0].mlp.c_fc.weight.detach().double().clone())

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.in_evaluation.append(model.transformer.h[0].mlp.c_fc.weight.detach().clone())


def arguments(tmp_path: Path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        max_steps=8,
        save_steps=4,
        save_strategy="steps",
        report_to=[],
        logging_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def test_once_per_optimizer_step_under_accumulation_against_a_reference(tmp_path: Path) -> None:
    model, ema, recorder = gpt2(), EMACallback(decay=0.9, final_dir=None), Recorder()
    Trainer(
        model=model,
        args=arguments(tmp_path, gradient_accumulation_steps=2),
        train_dataset=Tokens(),
        callbacks=[recorder, ema],
    ).train()
    assert ema.ema.num_updates == 8 == len(recorder.after_step)
    reference = gpt2().transformer.h[0].mlp.c_fc.weight.detach().double()
    for w in recorder.after_step:
        reference = reference.lerp(w, 0.1)
    torch.testing.assert_close(ema.ema.ema_model.transformer.h[0].mlp.c_fc.weight.double(), reference)


def test_evaluation_uses_the_ema_and_the_online_weights_come_back(tmp_path: Path) -> None:
    model, ema, recorder = gpt2(), EMACallback(decay=0.9, final_dir=None), Recorder()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, eval_strategy="steps", eval_steps=4),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8),
        callbacks=[recorder, ema],
    )
    trainer.train()
    assert len(recorder.in_evaluation) == 2
    assert not torch.equal(recorder.in_evaluation[-1], model.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(recorder.in_evaluation[-1], ema.ema.ema_model.transformer.h[0].mlp.c_fc.weight)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight.double(), recorder.after_step[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoints_hold_the_ema_and_resume_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    full = EMACallback(decay=0.9, final_dir=None)
    Trainer(model=gpt2(dtype), args=arguments(tmp_path / "full"), train_dataset=Tokens(), callbacks=[full]).train()

    first = EMACallback(decay=0.9, final_dir=None)
    args = arguments(tmp_path / "split")
    Trainer(model=gpt2(dtype), args=args, train_dataset=Tokens(), callbacks=[first]).train()
    checkpoint = tmp_path / "split" / "checkpoint-4"
    assert (checkpoint / WEIGHTS_NAME).is_file() and (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / MASTERS_NAME).is_file() == (dtype == torch.bfloat16)
    resumed = EMACallback(decay=0.9, final_dir=None)
    Trainer(model=gpt2(dtype), args=args, train_dataset=Tokens(), callbacks=[resumed]).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert resumed.ema.num_updates == full.ema.num_updates == 8
    for a, b in zip(
        resumed.ema.state_dict()["ema_model"].values(), full.ema.state_dict()["ema_model"].values(), strict=True
    ):
        assert torch.equal(a, b)
    if dtype == torch.bfloat16:
        for k, v in resumed.ema.state_dict()["master"].items():
            assert torch.equal(v, full.ema.state_dict()["master"][k]), k


def test_the_final_ema_loads_with_from_pretrained(tmp_path: Path) -> None:
    model, ema = gpt2(), EMACallback(decay=0.9)
    Trainer(model=model, args=arguments(tmp_path, save_strategy="no"), train_dataset=Tokens(), callbacks=[ema]).train()
    averaged = AutoModelForCausalLM.from_pretrained(tmp_path / "ema")
    for (name, a), b in zip(averaged.state_dict().items(), ema.ema.ema_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(model.lm_head.weight, averaged.lm_head.weight)  # the model kept its online weights
    assert averaged.lm_head.weight.data_ptr() == averaged.transformer.wte.weight.data_ptr()  # still tied


DDP_SCRIPT = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from polyak.transformers import EMACallback

class Tokens(torch.utils.data.Dataset):
    ids = torch.randint(0, 40, (32, 12), generator=torch.Generator().manual_seed(1))
    def __len__(self): return len(self.ids)
    def __getitem__(self, i): return {"input_ids": self.ids[i], "labels": self.ids[i]}

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
ema = EMACallback(decay=0.9, final_dir=None)
args = TrainingArguments(output_dir=sys.argv[1], use_cpu=True, per_device_train_batch_size=4, max_steps=4,
                         save_strategy="steps", save_steps=4, report_to=[], logging_strategy="no", disable_tqdm=True,
                         ddp_backend="gloo")
trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ema])
trainer.train()
rank = trainer.args.process_index
torch.save({"ema": ema.ema.ema_model.state_dict(), "updates": ema.ema.num_updates}, f"{sys.argv[1]}/rank{rank}.pt")
torch.distributed.barrier()  # every rank done before gloo tears down (an abort at exit otherwise, now and then)
torch.distributed.destroy_process_group()
"""


def test_ddp_ranks_hold_the_same_ema_and_rank_zero_writes_it(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    run_program(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path),
        ],
        cwd=tmp_path,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 4
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(v, ranks[1]["ema"][k]), k
    assert (tmp_path / "checkpoint-4" / WEIGHTS_NAME).is_file()


# -- Accelerate -------------------------------------------------------------------------------------------------------
def test_accelerate_checkpoints_an_ema_and_a_post_hoc_ema_exactly(tmp_path: Path) -> None:
    """A plain Accelerate loop: the EMA of the unwrapped model, registered for checkpointing."""

    def run(steps: int, resume: bool, folder: str):
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(torch.bfloat16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        ema = EMA(accelerator.unwrap_model(model), momentum=0.1)
        posthoc = PostHocEMA(accelerator.unwrap_model(model), snapshot_every=100, directory=tmp_path / folder)
        accelerator.register_for_checkpointing(ema, posthoc)
        if resume:
            accelerator.load_state(str(tmp_path / "state"))
        for _ in range(steps):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(ema.num_updates)).to(torch.bfloat16)
            loss = model(x).float().pow(2).mean()
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            ema.update()
            posthoc.update()
        return accelerator, ema, posthoc

    _, full, full_posthoc = run(6, False, "full")
    accelerator, _, _ = run(3, False, "split")
    accelerator.save_state(str(tmp_path / "state"))
    _, resumed, resumed_posthoc = run(3, True, "split")
    assert resumed.num_updates == full.num_updates == 6
    for a, b in zip(resumed.state_dict()["master"].values(), full.state_dict()["master"].values(), strict=True):
        assert torch.equal(a, b)
    for x, y in zip(resumed_posthoc.emas, full_posthoc.emas, strict=True):
        for a, b in zip(x.ema_model.parameters(), y.ema_model.parameters(), strict=True):
            assert torch.equal(a, b)


# -- bad input --------------------------------------------------------------------------------------------------------
def _garble(folder: Path, how: str) -> None:
    """Replace the EMA file of a checkpoint folder by a bad one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = "transformer.h.0.mlp.c_fc.weight"
    if how == "not safetensors":
        path.write_bytes(b"\x00" * 3 + b"not a safetensors file at all" * 10)
        return
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:200])
        return
    if how == "count not an int":
        metadata["num_updates"] = "four"
    elif how == "negative count":
        metadata["num_skipped"] = "-1"
    elif how == "no count":
        del metadata["num_updates"]
    elif how == "not polyak's":
        metadata = {"format": "pt"}
    elif how == "missing tensor":
        del tensors[name]
    elif how == "unexpected tensor":
        tensors["extra.weight"] = torch.zeros(2)
    elif how == "wrong shape":
        tensors[name] = torch.zeros(3, 3)
    elif how == "wrong dtype":
        tensors[name] = tensors[name].to(torch.float64)
    save_file(tensors, str(path), metadata=metadata)


BAD_FILES = [
    "not safetensors",
    "truncated",
    "count not an int",
    "negative count",
    "no count",
    "not polyak's",
    "missing tensor",
    "unexpected tensor",
    "wrong shape",
    "wrong dtype",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A callback after 4 steps, and the checkpoint of step 4 (the first callback's, with the same EMA)."""
    out = tmp_path_factory.mktemp("trained")
    callback = EMACallback(decay=0.9, final_dir=None)
    Trainer(model=gpt2(), args=arguments(out, max_steps=4), train_dataset=Tokens(), callbacks=[callback]).train()
    return callback, out / "checkpoint-4"


@pytest.mark.parametrize("how", BAD_FILES)
def test_a_bad_ema_file_is_refused_naming_it_and_the_ema_is_unchanged(tmp_path: Path, trained, how: str) -> None:
    import shutil

    callback, checkpoint = trained
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(checkpoint, folder)
    with torch.no_grad():  # an EMA unlike the file's: a load that wrote anything would show
        for p in callback.ema.ema_model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in callback.ema.state_dict()["ema_model"].items()}
    count = callback.ema.num_updates
    _garble(folder, how)
    with pytest.raises(ValueError, match=str(folder / WEIGHTS_NAME)):
        callback.load(folder)
    assert callback.ema.num_updates == count
    for k, v in callback.ema.state_dict()["ema_model"].items():
        assert torch.equal(v, before[k]), k
    # and resuming from it: refused at the start of train(), before any step
    model = gpt2()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=Tokens(), callbacks=[EMACallback()])
    with pytest.raises(ValueError, match=str(folder / WEIGHTS_NAME)):
        trainer.train(resume_from_checkpoint=str(folder))
    assert trainer.state.global_step == 4


def test_the_files_are_written_whole_and_a_masters_file_of_another_save_is_refused(tmp_path: Path, trained) -> None:
    callback, _ = trained
    bf16 = EMACallback(decay=0.9, final_dir=None)
    out = tmp_path / "bf16"
    Trainer(
        model=gpt2(torch.bfloat16), args=arguments(out, max_steps=4), train_dataset=Tokens(), callbacks=[bf16]
    ).train()
    written = sorted(p.name for p in (out / "checkpoint-4").iterdir() if p.name.startswith((".", "ema")))
    assert written == sorted([MASTERS_NAME, WEIGHTS_NAME])  # no temporary file left
    other = tmp_path / "other"
    bf16.ema.update()
    bf16.save(other)  # one update later
    (other / MASTERS_NAME).replace(out / "checkpoint-4" / MASTERS_NAME)
    with pytest.raises(ValueError, match="does not belong to"):
        bf16.load(out / "checkpoint-4")
    callback.save(other)  # a float32 EMA into that folder: the bf16 masters there go
    assert not (other / MASTERS_NAME).exists()


@pytest.mark.parametrize("name", ["", "a/b", "../x", " x", 3, "é"])
def test_a_name_that_is_no_file_name_is_refused(name) -> None:
    with pytest.raises(ValueError, match=f"name must be .* got {name!r}"):
        EMACallback(name=name)


def test_load_before_train_takes_the_ema_from_that_folder(tmp_path: Path, trained) -> None:
    _, checkpoint = trained
    fresh = EMACallback(decay=0.9, final_dir=None)
    with pytest.raises(ValueError, match="does not exist"):
        fresh.load(tmp_path)
    fresh.load(checkpoint)  # checked now, loaded by on_train_begin
    Trainer(model=gpt2(), args=arguments(tmp_path, max_steps=1), train_dataset=Tokens(), callbacks=[fresh]).train()
    assert fresh.ema.num_updates == 5  # the 4 of the folder, and this run's step


def test_a_flat_ema_of_a_tied_model_is_checkpointed_and_resumed(tmp_path: Path) -> None:
    """GPT-2 ties lm_head to wte; with flat=True the EMA model's tensors are views of one buffer. Each checkpoint's
    ema.safetensors is written (safetensors once refused the tied view) and resumes exactly."""
    from safetensors.torch import load_model

    full = EMACallback(decay=0.9, flat=True, final_dir=None)
    Trainer(model=gpt2(), args=arguments(tmp_path / "full"), train_dataset=Tokens(), callbacks=[full]).train()
    written = gpt2()
    load_model(written, str(tmp_path / "full" / "checkpoint-8" / WEIGHTS_NAME))
    for k, v in written.state_dict().items():
        assert torch.equal(v, full.ema.ema_model.state_dict()[k]), k
    resumed = EMACallback(decay=0.9, flat=True, final_dir=None)
    trainer = Trainer(model=gpt2(), args=arguments(tmp_path / "full"), train_dataset=Tokens(), callbacks=[resumed])
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed.ema.num_updates == 8
    for k, v in resumed.ema.ema_model.state_dict().items():
        assert torch.equal(v, full.ema.ema_model.state_dict()[k]), k


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(handle_buffers="bogus"), ValueError, "handle_buffers must be one of"),
        (dict(dtype=torch.int8), TypeError, "dtype must be a floating"),
        (dict(flat=1), TypeError, "flat must be a bool"),
        (dict(skip_nonfinite="yes"), TypeError, "skip_nonfinite must be a bool"),
        (dict(include=3), TypeError, "include must be"),
        (dict(device="nope"), ValueError, "device must name a torch device"),
    ],
)
def test_bad_options_are_refused_when_the_callback_is_made(kwargs: dict, error: type, match: str) -> None:
    """As polyak.EMA and the Lightning callback refuse them: at construction, not when train() starts (after the
    Trainer made its output folder)."""
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)
