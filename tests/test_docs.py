"""The documentation: it builds with warnings as errors (broken references included), documents every public
name, and every Python block of its pages is a complete program that runs.

``make docs`` builds it the same way (``sphinx -W``); the build here goes to a temporary folder.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _docs import DOCS, ROOT, blocks, run_program

PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [b for page in PAGES for b in blocks(page)]
# the public modules and what they export; the demo and the command line are documented by their --help
PUBLIC = ["polyak", "polyak.schedules", "polyak.ignite", "polyak.lightning", "polyak.transformers", "polyak.diffusers"]
PUBLIC += ["polyak.posthoc", "polyak.peft"] + (["polyak.convert"] if (ROOT / "src/polyak/convert.py").exists() else [])
NOT_DOCUMENTED_HERE = {"polyak.__main__", "polyak.demo", "polyak.ema"}  # polyak.ema: as polyak.EMA


def test_every_module_is_public_or_said_not_to_be() -> None:
    modules = {f"polyak.{p.stem}" for p in (ROOT / "src/polyak").glob("*.py") if not p.stem.startswith("_")}
    modules |= {f"polyak.{p.name}" for p in (ROOT / "src/polyak").iterdir() if (p / "__init__.py").exists()}
    assert modules - {"polyak.__init__"} <= set(PUBLIC) | NOT_DOCUMENTED_HERE, modules


def test_the_pages_use_only_fences_the_suite_runs_or_sphinx_reads() -> None:
    for page in PAGES:
        fences = set(re.findall(r"^\s*```(\S*)$", page.read_text(), flags=re.M))
        allowed = {"python", "bash", "text", "", "{toctree}", "{eval-rst}", "{include}"}
        assert fences <= allowed, (page, fences - allowed)  # a `py` block would not be run


def _members(cls: type) -> list[str]:
    """The public methods and properties ``cls`` defines itself, but for overrides of a framework's hooks
    (``on_train_end`` of a Lightning callback, documented by Lightning and in the class's docstring)."""
    names = []
    for name, value in vars(cls).items():
        if name.startswith("_") or not (callable(value) or isinstance(value, (property, classmethod, staticmethod))):
            continue
        if any(name in vars(base) for base in cls.__mro__[1:] if not base.__module__.startswith("polyak")):
            continue
        names.append(name)
    return names


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue  # modules have their own entry; type aliases carry their docstring in the source
            if not (obj.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for member in _members(obj):
                    value = vars(obj)[member]
                    doc = (value.fget if isinstance(value, property) else value).__doc__
                    if not (doc or "").strip():
                        missing.append(f"{module_name}.{name}.{member}")
    assert not missing, missing


def test_the_site_builds_without_a_warning_and_documents_every_public_name(tmp_path: Path) -> None:
    out = tmp_path / "html"
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    from sphinx.util.inventory import InventoryFile

    with open(out / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda *parts: "/".join(parts))
    documented = {name for entries in inventory.values() for name in entries}
    absent = []
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            home = getattr(obj, "__module__", module_name) if inspect.isclass(obj) or inspect.isfunction(obj) else ""
            candidates = {f"{module_name}.{name}", f"{home}.{name}"}
            if not candidates & documented:
                absent.append(f"{module_name}.{name}")
            elif inspect.isclass(obj):
                owners = candidates & documented
                absent += [
                    f"{module_name}.{name}.{m}" for m in _members(obj) if not {f"{o}.{m}" for o in owners} & documented
                ]
    assert not absent, absent
    page = (out / "benchmarks.html").read_text()
    assert "bytes" in page
    # the figures of BENCHMARKS.md show on the site: each referenced by the page and copied with it
    for figure in ("update-vs-floor", "memory", "scaling"):
        images = re.findall(rf'<img[^>]*src="([^"]*{figure}[^"]*\.svg)"', page)
        assert images and all((out / src).is_file() for src in images), (figure, images)
    assert (out / "changelog.html").is_file() and "0.2.0" in (out / "changelog.html").read_text()


def test_the_readme_links_into_pages_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), link


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_page_block_runs_as_a_program(block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_program(block, tmp_path)
