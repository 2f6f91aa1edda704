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
from collections.abc import Iterator

from benchmarks.timm_ema import load, wheel  # the one loader, shared with `make bench`

__all__ = ["installed", "load", "wheel"]
_NAMES = ("ModelEma", "ModelEmaV2", "ModelEmaV3")


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
