"""Sphinx configuration: the Markdown guide (MyST) and the API reference (autodoc, Google docstrings by napoleon).

Build with warnings as errors, as CI does (``pip install -e ".[docs]"`` first)::

    python -m sphinx -W --keep-going -n -b html docs docs/_build/html

``nitpicky`` makes every cross-reference that does not resolve a warning, so a broken ``:class:`` or
``:func:`` in a docstring fails the build; :func:`check_public_names_documented` makes a public name that no
API page documents fail it too.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import re
from typing import Any

from sphinx.util import logging

import curvature

project = "curvature"
author = "curvature developers"
copyright = "curvature developers"
release = version = curvature.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # "[...](operators.md#batches-and-reduction)" links to a heading of a guide page

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False  # the return type is in the signature
napoleon_use_ivar = True  # "Attributes:" as fields, so a documented property is not described twice
autodoc_member_order = "bysource"  # a module's members in the order of its __all__, a class's as written
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show "generator=None", not the repr of a default object
autodoc_default_options = {"members": True, "show-inheritance": True}

nitpicky = True
# There is no network to fetch the inventories of torch, numpy and scipy (intersphinx), so references to their
# objects, which the type hints make, cannot resolve: ignore those, and only those, external names.
# The standard library's inventory is out of reach for the same reason (collections.abc.Iterable, pathlib.Path).
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|scipy)(\..*)?"),
    (r"py:.*", r"(collections\.abc|pathlib)\..*"),
]

html_theme = "alabaster"
html_title = f"curvature {release}"

# Every name here, and every name in the ``__all__`` of each module listed, must be documented on an API page.
PUBLIC_MODULES = [
    "curvature",
    "curvature.optim",
    "curvature.optim.functional",
    "curvature.regularizers",
    "curvature.pruning",
    "curvature.pruning.obs",
    "curvature.compat",
    "curvature.compat.pyhessian",
    "curvature.sampling",
    "curvature.reference",
]
UNDOCUMENTED = {"curvature.__version__"}  # shown in the page titles instead


def public_names() -> list[str]:
    """Return the qualified name of every public object: the ``__all__`` of each module in ``PUBLIC_MODULES``.

    Returns:
        Names such as ``curvature.HessianOperator`` or ``curvature.optim.functional.hessian_free_step``.
    """
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return [name for name in names if name not in UNDOCUMENTED]


def check_public_names_documented(app: Any, env: Any) -> None:
    """Warn, so that ``-W`` fails the build, for each public name that no API page documents.

    Args:
        app: The Sphinx application.
        env: The build environment, after every page was read.
    """
    documented = set(env.get_domain("py").objects)
    for name in public_names():
        if name not in documented:
            logging.getLogger(__name__).warning(
                "public name %s is documented on no API page; add it to a page under docs/api/", name
            )


def _is_private(cls: type) -> bool:
    return any(part.startswith("_") for part in f"{cls.__module__}.{cls.__qualname__}".split("."))


def public_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """Show each private base class as its nearest public ancestor, and ``abc.ABC`` as ``object``.

    A class such as ``curvature.optim.SAM`` derives from a helper in a private module; its "Bases:" line
    names the public class a reader can look up instead (``torch.optim.Optimizer``).

    Args:
        app: The Sphinx application.
        name: The documented class's name.
        obj: The class.
        options: The directive's options.
        bases: The bases Sphinx shows, edited in place.
    """
    shown: list[Any] = []
    for base in bases:
        while isinstance(base, type) and _is_private(base) and base.__bases__:
            base = base.__bases__[0]
        base = object if base is abc.ABC else base
        if base not in shown:
            shown.append(base)
    if len(shown) > 1 and object in shown:  # a private mixin (the operator base's) adds nothing to read
        shown.remove(object)
    bases[:] = shown


def dataclass_factory_defaults(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str | None, str | None] | None:
    """Write a dataclass field's ``default_factory`` as a call (``dict()``) instead of ``<factory>``.

    ``<factory>``, what :mod:`inspect` shows, is not Python, so Sphinx could not parse the signature.

    Args:
        app: The Sphinx application.
        what: The kind of object.
        name: Its name.
        obj: The object.
        options: The directive's options.
        signature: The signature Sphinx shows.
        return_annotation: The return annotation Sphinx shows.

    Returns:
        The edited signature and return annotation, or None to leave them as they are.
    """
    if signature is None or "<factory>" not in signature or not dataclasses.is_dataclass(obj):
        return None
    for field in dataclasses.fields(obj):
        factory = getattr(field.default_factory, "__name__", "...")
        call = f"{factory}()" if factory.isidentifier() else "..."
        signature = re.sub(rf"\b({field.name}: [^=]*= )<factory>", rf"\g<1>{call}", signature)
    return signature, return_annotation


def setup(app: Any) -> None:
    """Register the check that every public name is documented and the two signature fixes.

    Args:
        app: The Sphinx application.
    """
    app.connect("env-check-consistency", check_public_names_documented)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("autodoc-process-signature", dataclass_factory_defaults)
