"""Post-hoc EMA (EDM2): snapshots, synthesis, atomic writes, no pickles, resume, ignite, command line."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import RemovableEventHandle
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from polyak import EMA
from polyak.posthoc import (
    FORMAT,
    PostHocEMA,
    PostHocEMAHandler,
    list_snapshots,
    posthoc_main,
    save_synthesized,
    snapshot_name,
    solve_weights,
    synthesize,
)
from polyak.schedules import power_function

SRC = Path(__file__).resolve().parents[1] / "src"


class Scalar(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(1, dtype=dtype))


def theta(k: int) -> float:
    """DESIGN.md's worked example: the online weight at update k."""
    return math.sin(k / 50) + k / 1000


def run_worked_example(folder: Path, dtype: torch.dtype = torch.float64, updates: int = 1000) -> PostHocEMA:
    model = Scalar(dtype)
    posthoc = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=100, directory=folder)
    for k in range(1, updates + 1):
        with torch.no_grad():
            model.theta.fill_(theta(k))
        posthoc.update()
    return posthoc


def stored(folder: Path, sigma_rel: float, t: int) -> dict[str, torch.Tensor]:
    return load_file(folder / snapshot_name(sigma_rel, t))


@pytest.fixture(scope="module")
def worked64(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("worked64")
    run_worked_example(folder)
    return folder


# -- the worked example of DESIGN.md ----------------------------------------------------------------------
def test_worked_example_stored_values(worked64):
    names = sorted(p.name for p in worked64.glob("*.safetensors"))
    assert names == [snapshot_name(s, t) for s in (0.05, 0.10) for t in range(100, 1001, 100)]
    assert stored(worked64, 0.05, 1000)["theta"].item() == pytest.approx(1.1637419090, abs=1e-10)
    assert stored(worked64, 0.10, 1000)["theta"].item() == pytest.approx(0.8630461481, abs=1e-10)
    with safe_open(str(worked64 / snapshot_name(0.05, 300)), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["format_version"] == "1" and meta["kind"] == "snapshot"
    assert int(meta["t"]) == 300
    assert float(meta["gamma"]) == pytest.approx(16.9721986023, abs=1e-9)
    assert float(meta["sigma_rel"]) == 0.05


@pytest.mark.parametrize(
    ("sigma_rel", "expected", "direct"),
    [(0.075, 0.9600049035, 0.9608373616), (0.15, 0.7698320276, 0.7685790710), (0.20, 0.6987821434, 0.6938348433)],
)
def test_worked_example_reconstructions(worked64, sigma_rel, expected, direct):
    state = synthesize(worked64, sigma_rel)
    assert state["theta"].dtype == torch.float64
    assert state["theta"].item() == pytest.approx(expected, abs=1e-10)
    # the directly tracked EMA of that width, for comparison: the reconstruction is close, not equal
    model = Scalar()
    ema = EMA(model, schedule=power_function(sigma_rel=sigma_rel))
    for k in range(1, 1001):
        with torch.no_grad():
            model.theta.fill_(theta(k))
        ema.update()
    assert ema.ema_model.theta.item() == pytest.approx(direct, abs=1e-10)
    assert abs(state["theta"].item() - direct) < 6e-3


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_a_stored_profile_is_reproduced_exactly(worked64, sigma_rel):
    for t in (1000, 500):
        assert torch.equal(synthesize(worked64, sigma_rel, step=t)["theta"], stored(worked64, sigma_rel, t)["theta"])


def test_worked_example_in_float32(tmp_path):
    run_worked_example(tmp_path, torch.float32)
    assert stored(tmp_path, 0.05, 1000)["theta"].dtype == torch.float32
    assert stored(tmp_path, 0.05, 1000)["theta"].item() == pytest.approx(1.1637419090, rel=2e-6)
    assert stored(tmp_path, 0.10, 1000)["theta"].item() == pytest.approx(0.8630461481, rel=2e-6)
    for sigma_rel, expected in [(0.075, 0.9600049035), (0.15, 0.7698320276), (0.20, 0.6987821434)]:
        state = synthesize(tmp_path, sigma_rel)
        assert state["theta"].dtype == torch.float32
        assert state["theta"].item() == pytest.approx(expected, rel=2e-6)
    assert synthesize(tmp_path, 0.075, dtype=torch.float64)["theta"].dtype == torch.float64
    assert torch.equal(synthesize(tmp_path, 0.10)["theta"], stored(tmp_path, 0.10, 1000)["theta"])


def test_low_precision_model_snapshots_its_float32_master(tmp_path):
    model = Scalar(torch.bfloat16)
    posthoc = PostHocEMA(model, snapshot_every=100, directory=tmp_path)
    for k in range(1, 201):
        with torch.no_grad():
            model.theta.fill_(theta(k))
        posthoc.update()
    snap = stored(tmp_path, 0.05, 200)["theta"]
    master = posthoc.emas[0].state_dict()["master"]["theta"]
    assert snap.dtype == torch.float32 and torch.equal(snap, master)
    state = synthesize(tmp_path, 0.05)
    assert state["theta"].dtype == torch.bfloat16
    assert torch.equal(state["theta"], posthoc.emas[0].ema_model.theta.detach())
    assert synthesize(tmp_path, 0.08, dtype=torch.float32)["theta"].dtype == torch.float32


def test_solve_weights_sum_to_one_and_pick_a_stored_profile():
    ts = [t for _ in range(2) for t in range(100, 1001, 100)]
    gammas = [g for g in (16.9721986023, 6.9372039376) for _ in range(10)]
    x = solve_weights(ts, gammas, 1000, 10.0)
    assert x.dtype == torch.float64 and float(x.sum()) == pytest.approx(1.0, abs=1e-12)
    assert solve_weights(ts, gammas, 700, 6.9372039376).tolist() == [0.0] * 16 + [1.0] + [0.0] * 3


# -- exactness on a constant model, step=, buffers ---------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.075, 0.13, 0.2, 0.28])
def test_a_constant_model_is_reproduced_exactly(tmp_path, sigma_rel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    posthoc = PostHocEMA(model, snapshot_every=7, directory=tmp_path)
    for _ in range(70):
        posthoc.update()
    for step in (None, 35, 7):
        state = synthesize(tmp_path, sigma_rel, step=step)
        assert list(state) == list(model.state_dict())
        for name, value in model.state_dict().items():
            assert torch.equal(state[name], value), name


def test_step_uses_only_earlier_snapshots(worked64, tmp_path):
    # a run stopped at t = 400 synthesizes what the full run synthesizes at step=400
    run_worked_example(tmp_path, updates=400)
    for sigma_rel in (0.075, 0.15):
        assert torch.equal(synthesize(worked64, sigma_rel, step=400)["theta"], synthesize(tmp_path, sigma_rel)["theta"])
    assert synthesize(worked64, 0.075, step=400)["theta"].item() != synthesize(worked64, 0.075)["theta"].item()


def test_buffers_come_from_the_latest_snapshot(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    posthoc = PostHocEMA(model, snapshot_every=5, directory=tmp_path)
    for _ in range(20):
        model.train()
        model(torch.randn(8, 3))  # moves the BatchNorm statistics
        with torch.no_grad():
            model[0].weight.add_(0.1)
        posthoc.update()
    state = synthesize(tmp_path, 0.07)
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 20
    assert torch.equal(state["1.running_mean"], model[1].running_mean)
    assert torch.equal(
        synthesize(tmp_path, 0.07, step=10)["1.running_mean"], stored(tmp_path, 0.05, 10)["1.running_mean"]
    )
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    fresh.load_state_dict(state)  # strict: every key, every shape
    with safe_open(str(tmp_path / snapshot_name(0.05, 20)), framework="pt") as f:
        assert '"averaged": false' in f.metadata()["tensors"]


def test_tied_weights_and_update_buffers(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False).half()
            self.b = nn.Linear(2, 2, bias=False).half()
            self.b.weight = self.a.weight
            self.register_buffer("scale", torch.ones(2, dtype=torch.float16))

    model = Tied()
    posthoc = PostHocEMA(model, snapshot_every=3, directory=tmp_path, handle_buffers="update")
    for _ in range(6):
        with torch.no_grad():
            model.a.weight.add_(0.01)
            model.scale.mul_(1.5)
        posthoc.update()
    snap = stored(tmp_path, 0.10, 6)
    assert snap["a.weight"].dtype == torch.float32 and torch.equal(snap["a.weight"], snap["b.weight"])
    assert snap["scale"].dtype == torch.float32  # averaged under "update": from the master
    state = synthesize(tmp_path, 0.10)
    assert state["a.weight"].dtype == torch.float16
    assert torch.equal(state["a.weight"], posthoc.emas[1].ema_model.a.weight)
    assert torch.equal(state["scale"], posthoc.emas[1].ema_model.scale)


# -- atomic writes -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_writer_killed_mid_snapshot_leaves_earlier_snapshots_intact(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        import torch
        from torch import nn
        import polyak.posthoc as posthoc
        import polyak.posthoc._files as posthoc_files

        folder = sys.argv[1]
        real_save = posthoc_files.save_file

        def killed_mid_write(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:  # as if the process died half-way through the file
                f.truncate(size // 2)
            print("killing", filename, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        model = nn.Linear(3, 2)
        ema = posthoc.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=10, directory=folder)
        for k in range(1, 41):
            with torch.no_grad():
                model.weight.add_(0.01 * k)
            if k == 40:
                posthoc_files.save_file = killed_mid_write
            ema.update()
        print("not killed", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "killing" in proc.stdout and "not killed" not in proc.stdout
    snapshots = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert snapshots == [snapshot_name(s, t) for s in (0.05, 0.10) for t in (10, 20, 30)]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in snapshots]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ema-0.0500-0000000040.safetensors.tmp-")
    for name in snapshots:
        assert load_file(tmp_path / name)["weight"].shape == (2, 3)
    assert [s.t for s in list_snapshots(tmp_path)] == [10, 10, 20, 20, 30, 30]
    state = synthesize(tmp_path, 0.07)
    nn.Linear(3, 2).load_state_dict(state)


def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import polyak.posthoc._files as posthoc_module

    model = nn.Linear(2, 2)
    posthoc = PostHocEMA(model, snapshot_every=2, directory=tmp_path)
    posthoc.update()
    posthoc.update()

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(posthoc_module, "save_file", failing)
    posthoc.update()
    with pytest.raises(OSError, match="disk full"):
        posthoc.update()
    assert sorted(p.name for p in tmp_path.iterdir()) == [snapshot_name(0.05, 2), snapshot_name(0.10, 2)]


# -- nothing is ever unpickled -----------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_in_the_folder_is_never_executed(worked64, tmp_path):
    folder = tmp_path / "snaps"
    folder.mkdir()
    for p in worked64.glob("*.safetensors"):
        (folder / p.name).write_bytes(p.read_bytes())
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    buffer = io.BytesIO()
    torch.save({"x": _Payload(marker)}, buffer)
    (folder / "evil.pt").write_bytes(buffer.getvalue())
    (folder / "evil.pkl").write_bytes(payload)
    (folder / "evil.safetensors.tmp-1").write_bytes(payload)
    assert synthesize(folder, 0.075)["theta"].item() == pytest.approx(0.9600049035, abs=1e-10)
    assert not marker.exists()

    (folder / "evil.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match=r"evil\.safetensors"):
        synthesize(folder, 0.075)
    (folder / "evil.safetensors").write_bytes(buffer.getvalue())  # a torch.save zip under a safetensors name
    with pytest.raises(ValueError, match=r"evil\.safetensors"):
        synthesize(folder, 0.075)
    assert not marker.exists()


# -- bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0, 0.0, -0.1, 0.3, 12**-0.5, float("nan"), float("inf"), True, "0.1"])
def test_bad_sigma_rel(worked64, sigma_rel):
    with pytest.raises(ValueError, match="sigma_rel"):
        synthesize(worked64, sigma_rel)


@pytest.mark.parametrize("step", [50, 150, 1100, 0, -100, 100.0, True, "100"])
def test_a_step_without_snapshot(worked64, step):
    with pytest.raises(ValueError, match="step"):
        synthesize(worked64, 0.1, step=step)


def test_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="directory .*does not exist"):
        synthesize(tmp_path / "missing", 0.1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory .*not a folder"):
        synthesize(tmp_path / "file", 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="directory .*no post-hoc EMA snapshots"):
        synthesize(empty, 0.1)


def test_invalid_safetensors_files_are_named(worked64, tmp_path):
    from safetensors.torch import save_file

    cases = {
        "garbage.safetensors": lambda p: p.write_bytes(b"\x00" * 40),
        "empty.safetensors": lambda p: p.write_bytes(b""),
        "truncated.safetensors": lambda p: p.write_bytes((worked64 / snapshot_name(0.05, 100)).read_bytes()[:-3]),
        "foreign.safetensors": lambda p: save_file({"theta": torch.zeros(1)}, str(p)),
        "no_t.safetensors": lambda p: save_file(
            {"theta": torch.zeros(1)},
            str(p),
            metadata={"format": FORMAT, "format_version": "1", "kind": "snapshot", "gamma": "1.0"},
        ),
        "future.safetensors": lambda p: save_file(
            {"theta": torch.zeros(1)}, str(p), metadata={"format": FORMAT, "format_version": "99"}
        ),
    }
    for name, write in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for p in worked64.glob("*.safetensors"):
            (folder / p.name).write_bytes(p.read_bytes())
        write(folder / name)
        with pytest.raises(ValueError, match=rf"{name}.*not a valid post-hoc EMA snapshot"):
            synthesize(folder, 0.1)


def test_a_second_run_into_the_same_folder_is_refused_at_its_first_write(tmp_path):
    first = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path)
    first.update()
    second = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path)
    with pytest.raises(ValueError, match=f"holds the snapshots of another run \\({first.run_id}\\)"):
        second.update()
    assert second.num_updates == 1  # the update happened; only its snapshot was refused
    assert {s.run for s in list_snapshots(tmp_path)} == {first.run_id}  # nothing of the second run written


def test_a_resumed_run_continues_its_id_and_its_folder(tmp_path):
    first = PostHocEMA(nn.Linear(2, 2), snapshot_every=2, directory=tmp_path)
    for _ in range(4):
        first.update()
    state = first.state_dict()
    resumed = PostHocEMA(nn.Linear(2, 2), snapshot_every=2, directory=tmp_path)
    assert resumed.run_id != first.run_id
    resumed.load_state_dict(torch.load(io.BytesIO(_saved(state)), weights_only=True))
    assert resumed.run_id == first.run_id
    resumed.update()
    resumed.update()
    assert [s.t for s in list_snapshots(tmp_path)] == [2, 2, 4, 4, 6, 6]
    synthesize(tmp_path, 0.07)


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_synthesize_refuses_a_folder_of_two_runs(tmp_path):
    for seed in (0, 1):
        torch.manual_seed(seed)
        run = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path / f"run{seed}")
        run.update()
        for path in run.directory.iterdir():
            path.rename(tmp_path / f"{seed}-{path.name}")
    with pytest.raises(ValueError, match="holds the snapshots of 2 runs"):
        synthesize(tmp_path, 0.1)


def test_snapshots_of_different_models_are_refused(tmp_path):
    run = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path)
    run.update()
    other = PostHocEMA(nn.Linear(3, 2), snapshot_every=2, directory=tmp_path / "other")
    other.run_id = run.run_id  # forged: one run, two models
    other.update()
    other.update()
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / path.name)
    with pytest.raises(ValueError, match="same tensors"):
        synthesize(tmp_path, 0.1)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--sigma-rel", "1e-200"], "argument --sigma-rel: sigma_rel must be in \\[0.0001"),
        (["--sigma-rel", "inf"], "argument --sigma-rel: sigma_rel must be in"),
        (["--sweep", "0.03:inf:0.01"], "argument --sweep: needs STEP > 0 and START <= STOP"),
        (["--sweep", "0.03:0.1:0"], "argument --sweep: needs STEP > 0"),
        (["--sigma-rel", "0.1", "--step", "-3"], "step=-3 has no snapshot"),
    ],
)
def test_command_line_refuses_bad_input_in_one_line(tmp_path, capsys, argv, match):
    run = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path / "snaps")
    run.update()
    with pytest.raises(SystemExit) as exit_info:
        code = posthoc_main(["--snapshots", str(tmp_path / "snaps"), "--out", str(tmp_path / "o.safetensors"), *argv])
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err


def test_command_line_never_overwrites_a_snapshot(tmp_path, capsys):
    run = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=tmp_path)
    run.update()
    target = tmp_path / snapshot_name(0.05, 1)
    before = target.read_bytes()
    assert posthoc_main(["--snapshots", str(tmp_path), "--sigma-rel", "0.07", "--out", str(target)]) == 2
    assert "is a snapshot: it is never overwritten" in capsys.readouterr().err
    assert target.read_bytes() == before


def test_bad_constructor_arguments(tmp_path):
    model = nn.Linear(2, 2)
    for sigma_rels, match in [
        ((), "at least one"),
        ((0.05, 0.3), "sigma_rels"),
        ((0.05, 0.05), "differ"),
        ("0.1", "sequence"),
    ]:
        with pytest.raises(ValueError, match=match):
            PostHocEMA(model, sigma_rels=sigma_rels, directory=tmp_path)
    with pytest.raises(ValueError, match="snapshot_every"):
        PostHocEMA(model, snapshot_every=0, directory=tmp_path)
    with pytest.raises(ValueError, match="handle_buffers"):
        PostHocEMA(model, handle_buffers="share", directory=tmp_path)
    with pytest.raises(RuntimeError, match="first update"):
        PostHocEMA(model, directory=tmp_path).snapshot()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = tmp_path / "snaps"
    posthoc = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=folder)
    assert posthoc.update() == [] and posthoc.num_updates == 1
    assert not folder.exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    assert len(posthoc.update()) == 2 and len(list(folder.glob("*.safetensors"))) == 2


# -- resume ------------------------------------------------------------------------------------------------
def test_resume_continues_identically(tmp_path):
    def train(model: nn.Module, posthoc: PostHocEMA, ks: range) -> None:
        for k in ks:
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    p.fill_(theta(k) + i)
            posthoc.update()

    torch.manual_seed(0)
    straight_model = nn.Linear(3, 2)
    straight = PostHocEMA(straight_model, snapshot_every=20, directory=tmp_path / "straight")
    train(straight_model, straight, range(1, 101))

    first_model = nn.Linear(3, 2)
    first = PostHocEMA(first_model, snapshot_every=20, directory=tmp_path / "resumed")
    train(first_model, first, range(1, 51))
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    del first

    model = nn.Linear(3, 2)
    resumed = PostHocEMA(model, snapshot_every=20, directory=tmp_path / "resumed")
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert resumed.num_updates == 50
    train(model, resumed, range(51, 101))

    assert sorted(p.name for p in (tmp_path / "straight").iterdir()) == sorted(
        p.name for p in (tmp_path / "resumed").iterdir()
    )
    for p in (tmp_path / "straight").iterdir():
        a, b = load_file(p), load_file(tmp_path / "resumed" / p.name)
        assert all(torch.equal(a[n], b[n]) for n in a), p.name
    for a, b in zip(straight.emas, resumed.emas, strict=True):
        assert a.num_updates == b.num_updates == 100
        for n, v in a.ema_model.state_dict().items():
            assert torch.equal(v, b.ema_model.state_dict()[n])


def test_load_state_dict_checks_before_changing(tmp_path):
    model = nn.Linear(2, 2)
    posthoc = PostHocEMA(model, directory=tmp_path)
    posthoc.update()
    state = posthoc.state_dict()
    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMA(model, sigma_rels=(0.05, 0.15), directory=tmp_path).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        posthoc.load_state_dict({"emas": state["emas"]})
    target = PostHocEMA(model, directory=tmp_path)
    bad = {**state, "emas": [state["emas"][0], {**state["emas"][1], "ema_model": {}}]}
    with pytest.raises(ValueError):
        target.load_state_dict(bad)
    assert target.num_updates == 0 and all(e.num_updates == 0 for e in target.emas)


# -- ignite ------------------------------------------------------------------------------------------------
def test_ignite_handler_snapshots_every_n_iterations(tmp_path):
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()

    trainer = Engine(step)
    handler = PostHocEMAHandler(model, sigma_rels=(0.05, 0.10), snapshot_every=3, directory=tmp_path)
    handle = handler.attach(trainer)
    assert isinstance(handle, RemovableEventHandle)
    trainer.run([torch.randn(4, 2) for _ in range(10)], max_epochs=1)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        snapshot_name(s, t) for s in (0.05, 0.10) for t in (3, 6, 9)
    ]
    assert handler.posthoc.num_updates == 10
    state = handler.state_dict()
    other = PostHocEMAHandler(nn.Linear(2, 1), snapshot_every=3, directory=tmp_path)
    other.load_state_dict(state)
    assert other.posthoc.num_updates == 10
    handle.remove()
    trainer.run([torch.randn(4, 2) for _ in range(3)], max_epochs=1)
    assert handler.posthoc.num_updates == 10

    every = PostHocEMAHandler(model, snapshot_every=2, directory=tmp_path / "every")
    every.attach(trainer, event=Events.ITERATION_COMPLETED(every=2))
    trainer.run([torch.randn(4, 2) for _ in range(8)], max_epochs=1)
    assert every.posthoc.num_updates == 4 and len(list((tmp_path / "every").glob("*.safetensors"))) == 4
    with pytest.raises(TypeError, match="Engine"):
        every.attach(object())  # type: ignore[arg-type]


# -- command line ------------------------------------------------------------------------------------------
def test_cli_writes_what_synthesize_returns(worked64, tmp_path, capsys):
    out = tmp_path / "ema.safetensors"
    argv = ["--snapshots", str(worked64), "--sigma-rel", "0.075", "--out", str(out), "--no-progress"]
    assert posthoc_main(argv) == 0
    assert torch.equal(load_file(out)["theta"], synthesize(worked64, 0.075)["theta"])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "synthesized" and meta["t"] == "1000" and float(meta["sigma_rel"]) == 0.075
    assert "wrote" in capsys.readouterr().out

    assert posthoc_main(["--snapshots", str(worked64), "--sigma-rel", "0.15", "--step", "300", "--out", str(out)]) == 0
    assert torch.equal(load_file(out)["theta"], synthesize(worked64, 0.15, step=300)["theta"])
    # a result written into the snapshot folder itself is skipped by later syntheses
    inside = tmp_path / "inside"
    inside.mkdir()
    for p in worked64.glob("*.safetensors"):
        (inside / p.name).write_bytes(p.read_bytes())
    assert (
        posthoc_main(["--snapshots", str(inside), "--sigma-rel", "0.2", "--out", str(inside), "--dtype", "float32"])
        == 0
    )
    written = inside / "posthoc-sigma0.2000-t0000001000.safetensors"
    assert load_file(written)["theta"].dtype == torch.float32
    assert synthesize(inside, 0.2)["theta"].item() == pytest.approx(0.6987821434, abs=1e-10)


def test_cli_sweep(worked64, tmp_path):
    out = tmp_path / "sweep"
    assert posthoc_main(["--snapshots", str(worked64), "--sweep", "0.03:0.20:0.01", "--out", str(out)]) == 0
    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 18
    assert files[0].name == "posthoc-sigma0.0300-t0000001000.safetensors"
    assert files[-1].name == "posthoc-sigma0.2000-t0000001000.safetensors"
    assert torch.equal(
        load_file(out / "posthoc-sigma0.1500-t0000001000.safetensors")["theta"], synthesize(worked64, 0.15)["theta"]
    )


def test_cli_errors(worked64, tmp_path, capsys):
    assert (
        posthoc_main(["--snapshots", str(tmp_path / "nope"), "--sigma-rel", "0.1", "--out", str(tmp_path / "o")]) == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert (
        posthoc_main(
            ["--snapshots", str(worked64), "--sigma-rel", "0.1", "--step", "150", "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "step=150" in capsys.readouterr().err
    for bad in (["--sigma-rel", "0.3"], ["--sweep", "0.2:0.1:0.01"], ["--sweep", "0.1:0.3:0.1"], ["--sweep", "x"], []):
        with pytest.raises(SystemExit) as e:
            posthoc_main(["--snapshots", str(worked64), "--out", str(tmp_path / "o"), *bad])
        assert e.value.code == 2
    assert not (tmp_path / "o").exists()


def test_save_synthesized_copies_shared_tensors(tmp_path):
    model = nn.Linear(2, 2)
    state = {"a": model.weight, "b": model.weight, "c": model.weight.t()}
    path = save_synthesized(state, tmp_path / "x.safetensors", {"note": "tied"})
    loaded = load_file(path)
    assert torch.equal(loaded["a"], model.weight) and torch.equal(loaded["c"], model.weight.t())
    with pytest.raises(ValueError, match="folder"):
        save_synthesized(state, tmp_path / "missing" / "x.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("handle_buffers", ["copy", "update"])
def test_profiles_updated_together_equal_separate_emas(tmp_path, dtype, handle_buffers):
    """One fused pass over all profiles gives, bit for bit, what separate EMAs give."""
    from polyak import EMA
    from polyak.schedules import power_function

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    posthoc = PostHocEMA(
        model, sigma_rels=(0.05, 0.10), snapshot_every=100, directory=tmp_path, handle_buffers=handle_buffers
    )
    separate = [EMA(model, schedule=power_function(sigma_rel=s), handle_buffers=handle_buffers) for s in (0.05, 0.10)]
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
        model.train()(torch.randn(8, 3, generator=g).to(dtype))
        posthoc.update()
        for e in separate:
            e.update()
    for fused, alone in zip(posthoc.emas, separate, strict=True):
        assert fused.num_updates == alone.num_updates == 7
        for (k, a), b in zip(
            fused.state_dict()["ema_model"].items(), alone.state_dict()["ema_model"].values(), strict=True
        ):
            assert torch.equal(a, b), k
        if dtype == torch.bfloat16:
            for k, a in fused.state_dict()["master"].items():
                assert torch.equal(a, alone.state_dict()["master"][k]), k


class Counted(nn.Linear):
    """A module with extra state (JSON), as some keep a step count or a config."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.steps = 0

    def get_extra_state(self) -> dict:
        return {"steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        self.steps = state["steps"]


def test_extra_state_is_kept_through_snapshots_synthesis_and_the_command_line(tmp_path):
    model = nn.Sequential(Counted())
    posthoc = PostHocEMA(model, snapshot_every=2, directory=tmp_path / "snaps")
    for k in range(4):
        posthoc.emas[0].ema_model[0].steps = posthoc.emas[1].ema_model[0].steps = k
        posthoc.update()
    state = synthesize(tmp_path / "snaps", 0.07)
    target = nn.Sequential(Counted())
    target.load_state_dict(state)
    assert target[0].steps == 3
    assert (
        posthoc_main(
            ["--snapshots", str(tmp_path / "snaps"), "--sigma-rel", "0.07", "--out", str(tmp_path / "o.safetensors")]
        )
        == 0
    )
    assert json.loads(safe_open_metadata(tmp_path / "o.safetensors")["extra_state"]) == {"0._extra_state": {"steps": 3}}


def safe_open_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_extra_state_that_is_not_json_is_refused_clearly(tmp_path):
    class Opaque(Counted):
        def get_extra_state(self):
            return object()

    posthoc = PostHocEMA(nn.Sequential(Opaque()), snapshot_every=1, directory=tmp_path)
    with pytest.raises(ValueError, match="extra state '0._extra_state' of the model .* never pickles"):
        posthoc.update()


def test_lora_post_hoc_ema_marks_only_the_adapter_averaged(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    posthoc = PostHocEMA(model, snapshot_every=1, directory=tmp_path, trainable_only=True)
    assert posthoc.emas[0].ema_model[0].weight.data_ptr() == model[0].weight.data_ptr()  # shared: costs nothing
    posthoc.update()
    (snapshot,) = [s for s in list_snapshots(tmp_path) if s.sigma_rel == 0.05]
    assert {n for n, i in snapshot.tensors.items() if i["averaged"]} == {"1.weight", "1.bias"}


@pytest.mark.parametrize(("device", "match"), [("meta", "must hold data"), ("cuda", "is not available")])
def test_devices_that_cannot_hold_the_ema_are_refused(tmp_path, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    with pytest.raises(ValueError, match=match):
        PostHocEMA(nn.Linear(2, 2), directory=tmp_path, device=device)
