"""The Python blocks of the README and of the documentation pages (``docs/**/*.md``), for the tests that run them.

A block is a fenced ``python`` block. A MyST comment line right above its fence names it for a test:
``% block: before`` (any word after ``block:``), so that a test can run a page's named blocks side by side.
Every block is a complete program: :func:`run_block` runs one as ``__main__`` in a namespace of its own.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
_NAME = re.compile(r"^% block: *(\S+) *$")


@dataclass(frozen=True)
class Block:
    path: Path
    index: int  # 0-based, among the page's python blocks
    heading: str  # the nearest heading above it
    name: str | None  # from a `% block: NAME` line right above the fence
    intro: str  # up to 400 characters of the page above the block
    code: str

    @property
    def id(self) -> str:
        page = self.path.relative_to(ROOT).as_posix()
        slug = re.sub(r"[^a-z0-9]+", "-", (self.name or self.heading).lower()).strip("-")
        return f"{page}:{self.index + 1}-{slug}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for i, m in enumerate(_FENCE.finditer(text)):
        above = text[: m.start()]
        headings = re.findall(r"^#+ (.+)$", above, flags=re.M)
        lines = above.rstrip("\n").splitlines()
        named = _NAME.match(lines[-1]) if lines else None
        found.append(
            Block(path, i, headings[-1] if headings else path.stem, named and named.group(1), above[-400:], m.group(1))
        )
    return found


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))] if DOCS.is_dir() else [ROOT / "README.md"]


def named(path: Path, name: str) -> Block:
    """The block of ``path`` named ``name`` (``% block: name``)."""
    found = [b for b in blocks(path) if b.name == name]
    if len(found) != 1:
        raise LookupError(f"{path} has {len(found)} blocks named {name!r}")
    return found[0]


def run_block(block: Block) -> dict[str, Any]:
    """Run ``block`` as ``__main__`` in a namespace of its own (in the current folder); return the namespace."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(block.code, block.id, "exec"), namespace)
    return namespace


TORCHRUN = "torchrun --nproc_per_node=2"


def run_program(block: Block, folder: Path) -> None:
    """Run ``block`` as users would, in ``folder`` (the current folder is changed by the caller): a block that
    says to run it with ``torchrun --nproc_per_node=2``, or that starts processes of its own, as a script in a
    fresh interpreter (under torchrun with 2 processes where it says so); any other in this process."""
    from _dist import free_port
    from _dist import run_program as run_script

    if TORCHRUN in block.intro or TORCHRUN in block.code or "Parallel(" in block.code:  # ranks: a script of its own
        script = folder / "block.py"
        script.write_text(block.code)
        command = [sys.executable, str(script)]
        if TORCHRUN in block.intro or TORCHRUN in block.code:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
            command += [f"--master_port={free_port()}", str(script)]
        run_script(command, cwd=folder)
        return
    if "timm" in block.code:  # timm's EMA, from its wheel (timm itself needs torchvision; see _timm.py)
        import _timm

        with _timm.installed():
            run_block(block)
        return
    run_block(block)
