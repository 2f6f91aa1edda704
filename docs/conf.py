"""Sphinx configuration of polyak's documentation: ``make docs`` builds it into ``docs/_build/html``, with
warnings as errors (the test suite builds it too: tests/test_docs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# the polyak beside these pages (a checkout or an unpacked sdist), not another one installed elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import polyak  # noqa: E402

project = "polyak"
author = "the polyak developers"
copyright = "2026, the polyak developers"
release = version = polyak.__version__  # the one source: pyproject.toml reads it too

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# the docstrings are Google style; type hints go into the description, where they read best
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}

# every reference must resolve: a broken one is an error (make docs runs with -W). Names of other libraries
# cannot be linked without their inventories (the build is offline), so they are exempt, and only they.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|ignite|lightning|transformers|accelerate|diffusers|safetensors|numpy|np)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Engine|Events|Trainer|TrainerCallback|LightningModule|Callback|Optimizer)"),
    (r"py:.*", r"(collections\.abc|typing|os|pathlib|contextlib|argparse)\..*"),
    (r"py:.*", r"(CallableEventWithFilter|EventsList|RemovableEventHandle)"),  # ignite's, as annotated
    (r"py:class", r"polyak\.(\w+\.)*_\w+"),  # private classes named in annotations (handles, helpers)
    (r"py:class", r"(Selector|Schedule)"),  # polyak's type aliases, as annotations name them
    (r"py:.*", r"(Any|Callable|Iterator|Iterable|Mapping|Sequence|PathLike|Path|Self)"),
]

html_theme = "pydata_sphinx_theme"
html_title = f"polyak {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path: list[str] = []
