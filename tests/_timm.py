"""timm's EMA classes, loaded from timm's own wheel, for the tests and documentation blocks that compare with them.

timm itself cannot be installed beside this torch: it requires torchvision, which has no build for it. Its EMA
classes (``ModelEma``, ``ModelEmaV2``, ``ModelEmaV3``) live in one self-contained file,
``timm/utils/model_ema.py``, which imports only the standard library and torch. :func:`install` reads that file
out of the wheel that ``make install`` downloads into ``.venv/wheels/`` and registers it as
``timm.utils.model_ema`` (with bare ``timm`` and ``timm.utils`` packages around it), so that
``from timm.utils import ModelEmaV3`` runs timm's real code, unchanged, without the rest of timm.
"""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".venv" / "wheels"
_SOURCE = "timm/utils/model_ema.py"
_NAMES = ("ModelEma", "ModelEmaV2", "ModelEmaV3")


def wheel() -> Path:
    """The newest timm wheel in ``.venv/wheels/``; FileNotFoundError (saying how to get one) if there is none."""
    found = sorted(WHEELS.glob("timm-*.whl"))
    if not found:
        raise FileNotFoundError(f"no timm wheel in {WHEELS}: run `make install` (it downloads timm's wheel there)")
    return found[-1]


def install() -> None:
    """Make ``timm.utils.model_ema`` (and ``from timm.utils import ModelEmaV3``) importable; idempotent.

    Does nothing where ``timm.utils.model_ema`` is already importable (a real timm, or an earlier call).
    """
    if "timm.utils.model_ema" in sys.modules:
        return
    path = wheel()
    with zipfile.ZipFile(path) as z:
        source = z.read(_SOURCE).decode("utf-8")
    timm = sys.modules.get("timm") or types.ModuleType("timm")
    utils = sys.modules.get("timm.utils") or types.ModuleType("timm.utils")
    for package, name in ((timm, "timm"), (utils, "timm.utils")):
        if not hasattr(package, "__path__"):
            package.__path__ = []  # a package, so that its submodules import
            package.__package__ = name
    module = types.ModuleType("timm.utils.model_ema")
    module.__file__ = f"{path}/{_SOURCE}"
    module.__package__ = "timm.utils"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    timm.utils = utils  # type: ignore[attr-defined]
    utils.model_ema = module  # type: ignore[attr-defined]
    for name in _NAMES:
        setattr(utils, name, getattr(module, name))
    sys.modules.setdefault("timm", timm)
    sys.modules.setdefault("timm.utils", utils)
    sys.modules["timm.utils.model_ema"] = module
