"""Every Python block of the README is a complete program, and runs as one: what users copy must work.

Each block runs on its own, as ``__main__``, in a namespace of its own and an empty folder; a block that
says to run it with ``torchrun --nproc_per_node=2``, or that starts processes of its own, runs as a script
in a fresh interpreter (under torchrun with 2 processes where it says so).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from _dist import free_port, run_program

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^(.*?)```python\n(.*?)```", README.read_text(), flags=re.S | re.M)
TORCHRUN = "torchrun --nproc_per_node=2"


def block_id(i: int) -> str:
    before = README.read_text().split("```python\n")[: i + 1]
    heading = re.findall(r"^#+ (.+)$", "```python\n".join(before), flags=re.M)[-1]
    return f"{i + 1}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}"


CODE = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_every_fenced_block_is_python_or_shell():
    fences = re.findall(r"^\s*```(\w*)$", README.read_text(), flags=re.M)
    assert set(fences) <= {"python", "bash", ""}, fences  # no `py` fragments that the suite would not run
    assert len(CODE) >= 9


@pytest.mark.parametrize("index", range(len(CODE)), ids=[block_id(i) for i in range(len(CODE))])
def test_readme_block_runs_as_a_program(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = CODE[index]
    intro = README.read_text().split(f"```python\n{code}")[0][-400:]
    if TORCHRUN in intro or TORCHRUN in code or "Parallel(" in code:  # ranks: a script of its own
        script = tmp_path / "block.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
        if TORCHRUN in intro or TORCHRUN in code:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
            command += [f"--master_port={free_port()}", str(script)]
        run_program(command, cwd=tmp_path)
        return
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md block {index + 1}", "exec"), {"__name__": "__main__"})
