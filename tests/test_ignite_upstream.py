"""ignite's own tests of its EMAHandler, run unmodified on polyak's but for the import.

``make install`` downloads the source distribution of the installed pytorch-ignite (its tests ship in it)
into ``.venv/sdists``; these tests unpack its ``tests/`` folder, change ``from ignite.handlers import
EMAHandler`` into ``from polyak import EMAHandler`` and nothing else, and run them with ignite's own
conftest: the single-process ones, and the distributed ones as ignite's CI runs them (pytest-xdist, one
process per rank, gloo on the CPU). Only tests that need hardware or software this machine lacks (a GPU, XLA,
Horovod, several nodes) may skip, and each skip must say so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import ignite
import pytest

IMPORT = "from ignite.handlers import EMAHandler"
OURS = "from polyak import EMAHandler"
ALLOWED_SKIPS = re.compile(r"GPU|CUDA|XLA|TPU|Horovod|hvd|multi-node|MULTINODE", re.I)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sdist = Path(sys.prefix) / "sdists" / f"pytorch_ignite-{ignite.__version__}.tar.gz"
    assert sdist.is_file(), f"{sdist} is missing: `make install` downloads ignite's source distribution there"
    root = tmp_path_factory.mktemp("ignite")
    with tarfile.open(sdist) as tar:
        prefix = f"pytorch_ignite-{ignite.__version__}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix + "tests/")]
        tar.extractall(root, members=members, filter="data")
    root = root / prefix
    swapped = 0
    for name in ("test_ema_handler.py", "test_state_param_scheduler.py"):
        path = root / "tests" / "ignite" / "handlers" / name
        text = path.read_text()
        n = len(re.findall(rf"^\s*{re.escape(IMPORT)}$", text, flags=re.M))
        path.write_text(re.sub(rf"^(\s*){re.escape(IMPORT)}$", rf"\g<1>{OURS}", text, flags=re.M))
        swapped += n
    assert swapped == 2, "expected one EMAHandler import in each file: ignite's tests changed shape"
    return root


def run(root: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Run pytest on ignite's tests; returns the test ids by outcome (from its JUnit report)."""
    report = tmp_path / "report.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
    result = subprocess.run(
        command, cwd=root, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600
    )
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(report).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        skipped = case.find("skipped")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"].append(test)
        elif skipped is not None:
            outcomes["skipped"].append(f"{test}: {skipped.get('message')}")
        else:
            outcomes["passed"].append(test)
    assert result.returncode in (0, 5) and not outcomes["failed"], result.stdout[-6000:] + result.stderr[-3000:]
    return outcomes


def assert_only_hardware_skips(outcomes: dict[str, list[str]]) -> None:
    unexpected = [s for s in outcomes["skipped"] if not ALLOWED_SKIPS.search(s)]
    assert not unexpected, unexpected


def test_ignites_ema_handler_tests_pass_on_polyak(upstream: Path, tmp_path: Path) -> None:
    outcomes = run(
        upstream,
        tmp_path,
        "tests/ignite/handlers/test_ema_handler.py",
        "-m",
        "not distributed and not tpu and not multinode_distributed",
    )
    assert_only_hardware_skips(outcomes)
    passed = {t.rpartition("::")[2] for t in outcomes["passed"]}
    for name in (
        "test_has_momentum_scheduler",
        "test_ema_warmup_func",
        "test_ema_get_const_momentum",
        "test_ema_buffer[update]",
        "test_ema_two_handlers",
        "test_ema_final_weight_cpu[2]",
    ):
        assert name in passed, (name, sorted(passed))
    assert len(passed) >= 14


def test_ignites_param_scheduler_with_ema_handler_passes_on_polyak(upstream: Path, tmp_path: Path) -> None:
    outcomes = run(
        upstream,
        tmp_path,
        "tests/ignite/handlers/test_state_param_scheduler.py",
        "-k",
        "test_param_scheduler_with_ema_handler",
    )
    assert [t.rpartition("::")[2] for t in outcomes["passed"]] == ["test_param_scheduler_with_ema_handler"]


def test_ignites_distributed_ema_tests_pass_on_polyak(upstream: Path, tmp_path: Path) -> None:
    outcomes = run(
        upstream,
        tmp_path,
        "tests/ignite/handlers/test_ema_handler.py",
        "-m",
        "distributed",
        "--dist=each",
        f"--tx=2*popen//python={sys.executable}",
        env={"WORLD_SIZE": "2"},
    )
    assert_only_hardware_skips(outcomes)
    passed = [t.rpartition("::")[2] for t in outcomes["passed"]]
    assert sorted(set(passed)) == [
        "test_ema_final_weight_distrib_gloo_cpu_or_gpu[1]",
        "test_ema_final_weight_distrib_gloo_cpu_or_gpu[2]",
    ]
