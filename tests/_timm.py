"""timm's EMA classes, loaded from timm's own wheel, for the tests and documentation blocks that compare with them.

timm itself cannot be installed beside this torch: it requires torchvision, which has no build for it. Its EMA
classes (``ModelEma``, ``ModelEmaV2``, ``ModelEmaV3``) live in one self-contained file,
``timm/utils/model_ema.py``, which imports only the standard library and torch. :func:`load` runs that file out
of the wheel that ``make install`` downloads into ``.venv/wheels/``; :func:`installed` registers it as
``timm.utils.model_ema`` for the length of a block, so that a documentation block's
``from timm.utils import ModelEmaV3`` runs timm's real code, unchanged, without the rest of timm.
"""

from __future__ import annotations

import contextlib
import sys
import types
import zipfile
from collections.abc import Iterator
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


def load() -> types.ModuleType:
    """timm's ``timm/utils/model_ema.py``, run from its wheel as a module of its own; ``sys.modules`` untouched."""
    global _loaded
    if _loaded is None:
        path = wheel()
        with zipfile.ZipFile(path) as z:
            source = z.read(_SOURCE).decode("utf-8")
        module = types.ModuleType("timm.utils.model_ema")
        module.__file__ = f"{path}/{_SOURCE}"
        module.__package__ = "timm.utils"
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        _loaded = module
    return _loaded


_loaded: types.ModuleType | None = None


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Inside the block, ``from timm.utils import ModelEmaV3`` (and ``timm.utils.model_ema``) import timm's
    classes from :func:`load`; afterwards ``sys.modules`` is as it was. The bare ``timm`` package must not
    outlive the block: transformers and diffusers probe for timm and would take it for the real one."""
    module = load()
    names = ("timm", "timm.utils", "timm.utils.model_ema")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    if "timm.utils.model_ema" in saved:  # a real timm
        yield saved["timm.utils.model_ema"]
        return
    timm, utils = types.ModuleType("timm"), types.ModuleType("timm.utils")
    for package, name in ((timm, "timm"), (utils, "timm.utils")):
        package.__path__ = []  # a package, so that its submodules import
        package.__package__ = name
    timm.utils = utils  # type: ignore[attr-defined]
    utils.model_ema = module  # type: ignore[attr-defined]
    for name in _NAMES:
        setattr(utils, name, getattr(module, name))
    sys.modules.update({"timm": timm, "timm.utils": utils, "timm.utils.model_ema": module})
    try:
        yield module
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
