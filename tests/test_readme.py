"""Every Python block of the README is a complete program, and runs as one: what users copy must work.

Each block runs on its own, as ``__main__``, in a namespace of its own and an empty folder (see ``_docs.py``;
the pages of the documentation run the same way in ``test_docs.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from _docs import ROOT, blocks, run_program

README = ROOT / "README.md"
BLOCKS = blocks(README)


def test_every_fenced_block_is_python_or_shell():
    fences = re.findall(r"^\s*```(\w*)$", README.read_text(), flags=re.M)
    assert set(fences) <= {"python", "bash", ""}, fences  # no `py` fragments that the suite would not run
    assert len(BLOCKS) >= 4


def test_the_readme_starts_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    assert [line.split()[:2] for line in first.group(1).splitlines()] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_a_program(block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_program(block, tmp_path)
