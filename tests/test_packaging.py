"""What a user meets first: the wheel and sdist carry what they should, and extras are optional for real."""

from __future__ import annotations

import runpy
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# run code in a fresh interpreter where the given top-level modules cannot be imported
BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"


def python(code: str, *, blocked: tuple[str, ...] = (), cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(names=blocked) + code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = out.glob("polyak-*.tar.gz")
    (wheel,) = out.glob("polyak-*.whl")
    return sdist, wheel


def test_sdist_carries_license_tests_benchmarks_examples_docs_changelog_and_makefile(dists: tuple[Path, Path]) -> None:
    """What `make test` and `make docs` read from an unpacked sdist (CI runs them there: .ci/sdist-check)."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "LICENSE",
        "README.md",
        "BENCHMARKS.md",
        "CHANGELOG.md",
        "Makefile",
        "tests/_dist.py",
        "tests/test_ema.py",
        "tests/test_docs.py",
        "benchmarks/__main__.py",
        "benchmarks/results.json",
        "examples/fsdp2_ema.py",
        "src/polyak/py.typed",
        "docs/conf.py",
        "docs/index.md",
        "docs/changelog.md",
        ".ci/run",
        ".ci/sdist-check",
    ):
        assert needed in names, needed
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*") if p.suffix in (".md", ".svg")}
    assert pages and pages <= names, sorted(pages - names)  # every page and figure of the site
    assert any(n.startswith("docs/figures/") and n.endswith(".svg") for n in names)
    assert not any("__pycache__" in n or n.startswith("docs/_build") for n in names)


def test_the_package_the_command_line_and_the_site_say_one_version(dists: tuple[Path, Path]) -> None:
    """polyak.__version__ is the one source: the wheel's and sdist's metadata, --version and the site read it."""
    import polyak

    version = polyak.__version__
    sdist, wheel = dists
    assert sdist.name == f"polyak-{version}.tar.gz" and wheel.name.startswith(f"polyak-{version}-")
    with zipfile.ZipFile(wheel) as z:
        (metadata,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        assert Parser().parsestr(z.read(metadata).decode())["Version"] == version
    with tarfile.open(sdist) as tar:
        pkg_info = tar.extractfile(f"polyak-{version}/PKG-INFO")
        assert pkg_info is not None and Parser().parsestr(pkg_info.read().decode())["Version"] == version
    done = subprocess.run([sys.executable, "-m", "polyak", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"polyak {version}", done
    site = runpy.run_path(str(ROOT / "docs" / "conf.py"))  # the site's configuration, as Sphinx reads it
    assert site["release"] == site["version"] == version and version in site["html_title"]
    assert f"## {version} - " in (ROOT / "CHANGELOG.md").read_text()  # the changelog has its entry


def test_wheel_carries_license_and_needs_only_torch(dists: tuple[Path, Path]) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(z.read(metadata).decode())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "polyak/py.typed" in names
    assert meta["License-Expression"] == "BSD-3-Clause"
    requires = meta.get_all("Requires-Dist")
    unconditional = sorted(r.split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r)
    assert unconditional == ["safetensors", "torch"]
    assert any(r.startswith("pytorch-ignite") and 'extra == "ignite"' in r for r in requires)
    assert {"ignite", "demo", "dev"} <= set(meta.get_all("Provides-Extra"))


def test_import_polyak_needs_only_torch() -> None:
    result = python(
        "import polyak, polyak.schedules, polyak.posthoc\n"
        "ema = polyak.EMA(__import__('torch').nn.Linear(2, 1)); ema.update()\n"
        "assert 'ignite' not in sys.modules or sys.modules['ignite'] is None\n",
        blocked=("ignite",),
    )
    assert result.returncode == 0, result.stderr


def test_emahandler_without_ignite_says_how_to_install_it() -> None:
    code = (
        "import importlib, polyak\n"
        "for attempt in ('from polyak import EMAHandler', 'import polyak.ignite', 'polyak.EMAHandler'):\n"
        "    try:\n"
        "        exec(attempt)\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(f'{type(e).__name__}: {e}')\n"
        "    sys.modules.pop('polyak.ignite', None)\n"
    )
    result = python(code, blocked=("ignite",))
    assert result.returncode == 0, result.stderr
    expected = (
        "ModuleNotFoundError: polyak.EMAHandler needs pytorch-ignite, which is not installed: "
        "pip install 'polyak[ignite]'"
    )
    assert result.stdout.strip().splitlines() == [expected] * 3


def test_the_other_integrations_say_how_to_install_what_they_need() -> None:
    code = (
        "for module in ('polyak.lightning', 'polyak.transformers'):\n"
        "    try:\n"
        "        __import__(module)\n"
        "    except ModuleNotFoundError as e:\n"
        "        print(e)\n"
        "import polyak.diffusers  # needs nothing but torch: diffusers' classes come in with its user's model\n"
    )
    result = python(code, blocked=("lightning", "transformers", "diffusers"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "polyak.lightning needs lightning, which is not installed: pip install 'polyak[lightning]'",
        "polyak.transformers needs transformers, which is not installed: pip install 'polyak[hf]'",
    ]


def test_demo_without_its_extras_exits_with_one_clear_line(tmp_path: Path) -> None:
    result = python(
        "from polyak.__main__ import main\nsys.exit(main(['demo', '--output-dir', 'runs']))",
        blocked=("sklearn", "tqdm"),
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "polyak demo needs scikit-learn, tqdm, which are not installed: pip install 'polyak[demo]'"
    )
    assert not (tmp_path / "runs").exists()  # checked before anything ran or was written
