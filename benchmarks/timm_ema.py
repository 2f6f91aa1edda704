"""timm's EMA classes for the benchmark, from timm itself where it is installed, else from its wheel.

timm cannot be installed beside this torch here: it requires torchvision, which has no build for it. Its EMA
classes (``ModelEma``, ``ModelEmaV2``, ``ModelEmaV3``) live in one self-contained file,
``timm/utils/model_ema.py``, which imports only the standard library and torch. :func:`load` runs that file,
unchanged, out of the wheel that ``make install`` downloads into ``.venv/wheels/``, as a module of its own
(``sys.modules`` untouched). The tests use it too (``tests/_timm.py``).
"""

from __future__ import annotations

import importlib.util
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".venv" / "wheels"
_SOURCE = "timm/utils/model_ema.py"
_loaded: types.ModuleType | None = None


def wheel() -> Path | None:
    """The newest timm wheel in ``.venv/wheels/``, or None."""
    found = sorted(WHEELS.glob("timm-*.whl"))
    return found[-1] if found else None


def available() -> bool:
    """Whether :func:`load` can give timm's EMA classes here."""
    return importlib.util.find_spec("timm") is not None or wheel() is not None


def load() -> types.ModuleType:
    """``timm.utils.model_ema``: timm's own where timm imports, else run from its wheel (FileNotFoundError,
    saying how to get it, where there is neither)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if importlib.util.find_spec("timm") is not None:
        import timm.utils.model_ema as module

        _loaded = module
        return module
    path = wheel()
    if path is None:
        raise FileNotFoundError(f"no timm wheel in {WHEELS}: run `make install` (it downloads timm's wheel there)")
    with zipfile.ZipFile(path) as z:
        source = z.read(_SOURCE).decode("utf-8")
    module = types.ModuleType("timm.utils.model_ema")
    module.__file__ = f"{path}/{_SOURCE}"
    module.__package__ = "timm.utils"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    _loaded = module
    return module
