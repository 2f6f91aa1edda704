"""Optional dependencies: import them, or say in one line which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

# the distribution that provides each module, and the polyak extra that installs it
_PROVIDERS = {
    "ignite": ("pytorch-ignite", "ignite"),
    "lightning": ("lightning", "lightning"),
    "transformers": ("transformers", "hf"),
    "sklearn": ("scikit-learn", "demo"),
    "matplotlib": ("matplotlib", "demo"),
    "tqdm": ("tqdm", "demo"),
    "peft": ("peft", "peft"),
    "deepspeed": ("deepspeed", "deepspeed"),
}


def missing(*modules: str) -> list[str]:
    """The names of ``modules`` that cannot be imported."""
    out = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def install_hint(modules: list[str], what: str) -> str:
    """One line: ``what`` needs these distributions, and the pip command that installs them."""
    dists = sorted({_PROVIDERS.get(m, (m, None))[0] for m in modules})
    extras = sorted({e for m in modules if (e := _PROVIDERS.get(m, (None, None))[1])})
    how = f"pip install 'polyak[{','.join(extras)}]'" if extras else f"pip install {' '.join(dists)}"
    return f"{what} needs {', '.join(dists)}, which {'is' if len(dists) == 1 else 'are'} not installed: {how}"


def require(module: str, what: str) -> ModuleType:
    """Import ``module``, or raise ``ModuleNotFoundError`` saying which extra to install for ``what``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == module.split(".")[0]:
            raise ModuleNotFoundError(install_hint([module.split(".")[0]], what), name=e.name) from None
        raise
