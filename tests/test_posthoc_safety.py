"""Post-hoc EMA safety (issue 17): resuming from an earlier checkpoint, one run per folder, and the command
line's handling of bad arguments and of what lies at ``--out``."""

from __future__ import annotations

import io
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import polyak
import polyak.demo
import polyak.posthoc._files as posthoc_files
from polyak.__main__ import main
from polyak.posthoc import FolderInUse, PostHocEMA, list_snapshots, save_synthesized, snapshot_name, synthesize

SRC = Path(polyak.__file__).resolve().parents[1]  # the polyak under test, for the subprocesses
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _drive(model: nn.Module, posthoc: PostHocEMA, values: dict[int, float]) -> None:
    """Set every weight of ``model`` to ``values[k]`` and update, for each k in order."""
    for value in values.values():
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        posthoc.update()


def _state_bytes(posthoc: PostHocEMA) -> bytes:
    buffer = io.BytesIO()
    torch.save(posthoc.state_dict(), buffer)
    return buffer.getvalue()


def _load(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=True)


def _snapshot_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "snaps"
    posthoc = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=folder)
    posthoc.update()
    posthoc.update()
    return folder  # and the PostHocEMA, garbage, gives the folder back


# -- 1. resuming from an earlier checkpoint: the abandoned timeline's later snapshots are not mixed in ---------
def test_a_run_resumed_from_an_earlier_checkpoint_synthesizes_its_own_timeline_only(tmp_path):
    old = {k: float(k) for k in range(1, 101)}  # the first run's weights reach 100
    new = {k: (float(k) if k <= 30 else 30.0 - 0.5 * (k - 30)) for k in range(1, 51)}  # the resumed run's stay <= 30

    model = nn.Linear(3, 2)
    first = PostHocEMA(model, snapshot_every=10, directory=tmp_path / "run")
    _drive(model, first, {k: old[k] for k in range(1, 31)})
    checkpoint = _state_bytes(first)  # saved at update 30
    _drive(model, first, {k: old[k] for k in range(31, 101)})
    del first

    model = nn.Linear(3, 2)
    resumed = PostHocEMA(model, snapshot_every=10, directory=tmp_path / "run")
    with pytest.warns(UserWarning, match=r"resumed at update 30: moved the 14 snapshots of the abandoned timeline"):
        resumed.load_state_dict(_load(checkpoint))
    _drive(model, resumed, {k: new[k] for k in range(31, 51)})

    model = nn.Linear(3, 2)
    straight = PostHocEMA(model, snapshot_every=10, directory=tmp_path / "straight")
    _drive(model, straight, new)  # the new timeline, uninterrupted

    assert [s.t for s in list_snapshots(tmp_path / "run")] == [t for t in range(10, 51, 10) for _ in (0, 1)]
    for sigma_rel in (0.05, 0.07, 0.15):
        got, want = synthesize(tmp_path / "run", sigma_rel), synthesize(tmp_path / "straight", sigma_rel)
        for name in want:
            assert torch.equal(got[name], want[name]), (sigma_rel, name)
        assert 0.0 < got["weight"].max().item() < 30.0  # the first run's weights (up to 100) are not mixed in
    # the abandoned snapshots are moved, not deleted: that timeline is still there to synthesize
    aside = tmp_path / "run" / "abandoned-after-t0000000030"
    assert sorted(p.name for p in aside.iterdir()) == [
        snapshot_name(s, t) for s in (0.05, 0.10) for t in range(40, 101, 10)
    ]
    assert synthesize(aside, 0.10)["weight"].min().item() > 60.0


# -- 2. one run per folder ---------------------------------------------------------------------------------------
def test_two_objects_in_one_process_never_write_into_one_folder(tmp_path):
    folder = tmp_path / "snaps"
    model = nn.Linear(2, 2)
    first = PostHocEMA(model, snapshot_every=2, directory=folder)
    _drive(model, first, {1: 1.0, 2: 2.0})
    for path in folder.iterdir():  # even with its files gone, the folder stays the first run's while it lives
        path.unlink()
    other = PostHocEMA(nn.Linear(2, 2), snapshot_every=2, directory=folder)
    other.update()
    with pytest.raises(FolderInUse, match=re.escape(f"directory {str(folder)!r} is in use by another PostHocEMA")):
        other.update()
    assert list(folder.iterdir()) == []  # the refused write wrote nothing
    _drive(model, first, {3: 3.0, 4: 4.0})
    assert [s.t for s in list_snapshots(folder)] == [4, 4]
    assert {s.run for s in list_snapshots(folder)} == {first.run_id}


def test_a_resumed_run_takes_its_folder_over_from_the_object_it_replaces(tmp_path):
    folder = tmp_path / "snaps"
    model = nn.Linear(2, 2)
    first = PostHocEMA(model, snapshot_every=2, directory=folder)
    _drive(model, first, {1: 1.0, 2: 2.0})
    state = _state_bytes(first)

    resumed_model = nn.Linear(2, 2)
    resumed = PostHocEMA(resumed_model, snapshot_every=2, directory=folder)
    resumed.load_state_dict(_load(state))  # same run, same process: the resumed one takes the folder
    _drive(resumed_model, resumed, {3: -3.0, 4: -4.0})
    with pytest.raises(FolderInUse, match=re.escape(f"directory {str(folder)!r} was taken over")):
        _drive(model, first, {3: 3.0, 4: 4.0})  # the abandoned object would replace the resumed run's files
    with pytest.raises(FolderInUse, match="was taken over"):
        first.snapshot()
    assert [s.t for s in list_snapshots(folder)] == [2, 2, 4, 4]
    assert load_file(folder / snapshot_name(0.10, 4))["weight"].max().item() < 0  # the resumed run's values


def test_close_or_deletion_gives_the_folder_back(tmp_path):
    folder = tmp_path / "snaps"
    model = nn.Linear(2, 2)
    with PostHocEMA(model, snapshot_every=1, directory=folder) as first:
        _drive(model, first, {1: 1.0})
        state = _state_bytes(first)
        other = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=folder)
        for path in folder.iterdir():
            path.unlink()
        with pytest.raises(FolderInUse):
            other.update()
    other.snapshot()  # first is closed: the folder is free
    assert {s.run for s in list_snapshots(folder)} == {other.run_id}
    del other  # garbage collection gives it back too
    for path in folder.iterdir():
        path.unlink()
    again = PostHocEMA(model, snapshot_every=1, directory=folder)
    again.load_state_dict(_load(state))
    _drive(model, again, {2: 2.0})
    assert [s.t for s in list_snapshots(folder)] == [2, 2]


def test_a_second_process_is_refused_and_a_killed_process_leaves_no_lock(tmp_path):
    folder, state_file = tmp_path / "snaps", tmp_path / "state.pt"
    script = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        from polyak.posthoc import PostHocEMA
        posthoc = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=sys.argv[1])
        posthoc.update()
        torch.save(posthoc.state_dict(), sys.argv[2])
        print("ready", flush=True)
        sys.stdin.readline()  # holds the folder until killed
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder), str(state_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        state = torch.load(state_file, weights_only=True)
        resumed = PostHocEMA(nn.Linear(2, 2), snapshot_every=1, directory=folder)
        run_id = resumed.run_id
        with pytest.raises(FolderInUse, match=re.escape(f"directory {str(folder)!r} is in use by another process")):
            resumed.load_state_dict(state)
        assert resumed.num_updates == 0 and resumed.run_id == run_id  # the refused load changed nothing
    finally:
        proc.kill()  # SIGKILL: no clean-up runs; the OS drops the lock with the process
        proc.wait(timeout=30)
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    resumed.load_state_dict(state)
    resumed.update()
    assert [s.t for s in list_snapshots(folder)] == [1, 1, 2, 2]


# -- 3. --out never replaces a link, a folder or a special file ---------------------------------------------------
def _refused(capsys, argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "directory"])
def test_posthoc_out_refuses_what_is_not_a_regular_file(tmp_path, capsys, kind):
    snaps = _snapshot_folder(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    if kind == "symlink":
        out = out_dir / "ema.safetensors"
        out.symlink_to(precious)
        match, target = r"--out '.*ema\.safetensors' is a symbolic link: only a regular file", out
    elif kind == "dangling symlink":
        out = out_dir / "ema.safetensors"
        out.symlink_to(tmp_path / "nowhere")
        match, target = "is a symbolic link", out
    elif kind == "fifo":
        out = out_dir / "ema.safetensors"
        os.mkfifo(out)
        match, target = r"is a FIFO \(named pipe\): only a regular file", out
    else:  # --out a folder to write into, where the file's name is taken by a folder
        out = out_dir
        target = out_dir / "posthoc-sigma0.0700-t0000000002.safetensors"
        target.mkdir()
        match = "is a directory: only a regular file"
    before = os.lstat(target)
    _refused(capsys, ["posthoc", "--snapshots", str(snaps), "--sigma-rel", "0.07", "--out", str(out)], match)
    after = os.lstat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in out_dir.iterdir()) == [target.name]  # no temporary file left behind


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_save_synthesized_refuses_what_is_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "ema.safetensors"
    if kind == "symlink":
        (tmp_path / "target").write_text("keep me")
        path.symlink_to(tmp_path / "target")
    else:
        os.mkfifo(path)
    with pytest.raises(ValueError, match="only a regular file"):
        save_synthesized({"w": torch.ones(2)}, path)
    assert path.is_symlink() if kind == "symlink" else stat.S_ISFIFO(os.lstat(path).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ema.safetensors"] + ["target"] * (kind == "symlink"))


def test_posthoc_out_fifo_from_the_command_line(tmp_path):
    snaps = _snapshot_folder(tmp_path)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    argv = [sys.executable, "-m", "polyak", "posthoc", "--snapshots", str(snaps), "--sigma-rel", "0.07"]
    proc = subprocess.run([*argv, "--out", str(fifo)], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        f"polyak posthoc: error: --out {str(fifo)!r} is a FIFO (named pipe): only a "
        "regular file (or a new path) is written over"
    ]
    assert proc.stdout == "" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- 4. every bad argument of the command line: one line naming it, exit 2 ----------------------------------------
def _no_access(path: Path):
    real = os.access

    def access(p, mode, *args, **kwargs):
        return False if Path(p) == path else real(p, mode, *args, **kwargs)

    return access


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("--snapshots ''", r"argument --snapshots: must be the snapshot folder, got ''"),
        ("--snapshots missing", r"--snapshots '.*missing' does not exist"),
        ("--snapshots a file", r"--snapshots '.*file\.txt' is not a folder"),
        ("--out ''", r"argument --out: must be a file or folder path, got ''"),
        ("--out in a missing folder", r"--out '.*nofolder/ema\.safetensors': folder '.*nofolder' does not exist"),
        ("--out unwritable folder", r"--out '.*ro/ema\.safetensors': folder '.*ro' is not writable"),
        ("--out write fails", r"--out: could not write '.*ema\.safetensors': .*no space left"),
        ("--sweep --out a file", r"--out '.*file\.txt' is not a folder: with --sweep"),
    ],
)
def test_posthoc_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, case, match):
    snaps = _snapshot_folder(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ro").mkdir()
    args = {"--snapshots": str(snaps), "--sigma-rel": "0.07", "--out": str(tmp_path / "ema.safetensors")}
    if case == "--snapshots ''":
        args["--snapshots"] = ""
    elif case == "--snapshots missing":
        args["--snapshots"] = str(tmp_path / "missing")
    elif case == "--snapshots a file":
        args["--snapshots"] = str(tmp_path / "file.txt")
    elif case == "--out ''":
        args["--out"] = ""
        monkeypatch.chdir(tmp_path)
    elif case == "--out in a missing folder":
        args["--out"] = str(tmp_path / "nofolder" / "ema.safetensors")
    elif case == "--out unwritable folder":
        args["--out"] = str(tmp_path / "ro" / "ema.safetensors")
        monkeypatch.setattr(os, "access", _no_access(tmp_path / "ro"))
    elif case == "--out write fails":
        from safetensors import SafetensorError

        def full(*a, **k):
            raise SafetensorError("Error while serializing: I/O error: no space left on device")

        monkeypatch.setattr(posthoc_files, "save_file", full)
    elif case == "--sweep --out a file":
        del args["--sigma-rel"]
        args.update({"--sweep": "0.05:0.07:0.01", "--out": str(tmp_path / "file.txt")})
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(capsys, ["posthoc", "--no-progress", *[a for kv in args.items() for a in kv]], match)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "file.txt").read_text() == "x"


def test_posthoc_says_what_it_wrote_where(tmp_path, capsys, monkeypatch):
    snaps = _snapshot_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["posthoc", "--snapshots", "snaps", "--sweep", "0.05:0.07:0.01", "--out", "sweep"]) == 0
    lines = capsys.readouterr().out.splitlines()
    folder = tmp_path / "sweep"
    names = [f"posthoc-sigma{s:.4f}-t0000000002.safetensors" for s in (0.05, 0.06, 0.07)]
    assert lines == [
        *(f"wrote {folder / n} (sigma_rel={s:g}, t=2)" for n, s in zip(names, (0.05, 0.06, 0.07), strict=True)),
        f"wrote 3 files into {folder}",
    ]
    assert sorted(p.name for p in folder.iterdir()) == names
    assert torch.equal(load_file(folder / names[2])["weight"], synthesize(snaps, 0.07)["weight"])


def _demo_must_not_start(*args, **kwargs):
    raise AssertionError("the demo started despite a bad argument")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--output-dir", ""], r"argument --output-dir: output_dir must be a folder path, got ''"),
        (["--output-dir", "{tmp}/file.txt"], r"argument --output-dir: output_dir '.*file\.txt' exists and is not a"),
        (["--output-dir", "{tmp}/file.txt/runs"], r"argument --output-dir: .*'.*file\.txt' exists and is not a folder"),
        (["--output-dir", "{tmp}/ro/runs"], r"argument --output-dir: output_dir '.*ro/runs' is not writable"),
        (["--seed", "-1"], r"argument --seed: must be an int in \[0, 2\*\*64 - 1\], got -1"),
        (["--seed", str(2**64)], r"argument --seed: must be an int in \[0, 2\*\*64 - 1\]"),
        (["--threads", "1000000"], r"argument --threads: must be an int in \[1, \d+\] \(the CPU count\)"),
        (["--held-out", "0.0001"], r"argument --held-out: must leave at least one of the 1797 images on each side"),
        (["--held-out", "0.9999"], r"argument --held-out: must leave at least one"),
    ],
)
def test_demo_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, argv, match):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", _no_access(tmp_path / "ro"))
    monkeypatch.setattr(polyak.demo, "run_demo", _demo_must_not_start)
    monkeypatch.chdir(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    _refused(
        capsys,
        [
            "demo",
            "--no-progress",
            *(["--output-dir", str(tmp_path / "runs")] if "--output-dir" not in argv else []),
            *argv,
        ],
        match,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "ro"]


def test_demo_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    """The folder passes the checks but creating the run directory fails (e.g. permissions changed since)."""
    blocked = tmp_path / "blocked"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(blocked):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def run_demo(*, output_dir, **kwargs):  # the demo up to where it makes its run directory (no training)
        polyak.demo._new_run_dir(Path(output_dir))
        raise AssertionError("the run directory was made")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(polyak.demo, "run_demo", run_demo)
    argv = ["demo", "--no-progress", "--no-posthoc", "--epochs", "1", "--output-dir", str(blocked)]
    _refused(
        capsys,
        argv,
        rf"polyak demo: error: argument --output-dir: output_dir '{re.escape(str(blocked))}': "
        "cannot create a run directory in it \\(PermissionError: .*Permission denied",
    )
    assert not blocked.exists()
