"""Sphinx configuration: the guides (docs/*.md, read by MyST) and the API reference (autodoc).

Build (the ``docs`` extra: ``pip install -e ".[docs]"``)::

    sphinx-build -W -b html docs docs/_build/html

The API pages (``docs/api/``, not committed) are written at every build, one per public module of
the package (no part of its dotted path starts with ``_``), so a renamed or new module needs no edit
here. The build is nitpicky: every cross-reference to natural_tangents must resolve, and ``-W``
makes a broken one, or malformed reStructuredText in a docstring, fail the build. References to
other libraries (torch, numpy, the standard library) stay plain text: the build needs no network.

Docstrings are Google style (Args:, Returns:, Raises:, Attributes:) in plain text with Unicode
maths; these rules keep that text as written:

* ``Attributes:``, and a ``Returns:`` of several ``name: description`` entries, list named values
  as ``Args:`` does;
* the first line of an attribute's or a property's docstring is prose, never ``type: description``;
* ``|x|`` is an absolute value or a size, never a substitution, and ``(*lead, N)`` a shape;
* an indented block after a paragraph of prose is code or a formula: shown as written (literal).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil
import re
import shutil
import typing
from pathlib import Path

from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring

import natural_tangents

project = "natural-tangents"
release = version = natural_tangents.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.mathjax"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Guides: headings get anchors for links such as [memory](cost.md#memory).
myst_heading_anchors = 3

# API pages
autosummary_generate = False
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # not torch's docstrings for forward() and the like
autodoc_docstring_signature = False  # signatures come from the code, not a docstring's first line
autoclass_content = "both"

nitpicky = True
# Bases that are internal by design (not in their module's __all__), shown in "Bases:" lines.
nitpick_ignore = [("py:class", "natural_tangents.fisher.base.DualBatch")]

html_theme = "alabaster"
html_title = "natural-tangents"

_NAPOLEON_OPTIONS = {
    "napoleon_google_docstring": True,
    "napoleon_numpy_docstring": False,
    "napoleon_use_rtype": False,
    "napoleon_attr_annotations": False,
}
_NAPOLEON = NapoleonConfig(**_NAPOLEON_OPTIONS, napoleon_custom_sections=[("Attributes", "params_style")])
# For a "Returns:" that lists several named values ("images: ...", "labels: ..."), rendered like "Args:".
_NAPOLEON_NAMED = NapoleonConfig(
    **_NAPOLEON_OPTIONS, napoleon_custom_sections=[("Attributes", "params_style"), ("Returns", "params_style")]
)
_NAMED_ENTRY = re.compile(r"[A-Za-z_][\w, ]*: ")


def _names_returns(lines: list[str]) -> bool:
    """Whether the "Returns:" section lists two or more entries, each ``name: description``."""
    for i, line in enumerate(lines):
        if line.strip() == "Returns:":
            indent = len(line) - len(line.lstrip())
            body = []
            for entry in lines[i + 1 :]:
                if entry.strip() and len(entry) - len(entry.lstrip()) <= indent:
                    break
                body.append(entry)
            body = [b for b in body if b.strip()]
            if not body:
                return False
            top = min(len(b) - len(b.lstrip()) for b in body)
            entries = [b.strip() for b in body if len(b) - len(b.lstrip()) == top]
            return len(entries) >= 2 and all(_NAMED_ENTRY.match(e) for e in entries)
    return False


_LITERAL = re.compile(r"(``.+?``|:math:`[^`]*`)")


def _plain_text(line: str) -> str:
    """Escape, outside ``literals``, the bars of |x| and the star of a shape (*lead, N); join a
    literal to a following letter (``Tensor``s)."""
    line = re.sub(r"((?<![\w`])``[^`\s](?:[^`]*[^`\s])?``)(?=\w)", r"\1\\ ", line)
    parts = _LITERAL.split(line)
    for i in range(0, len(parts), 2):
        part = re.sub(r"(?<!\\)\|", r"\\|", parts[i])
        parts[i] = re.sub(r"(?<=[(\[])\*(?=\w)", r"\\*", part)
    return "".join(parts)


def _literal_blocks(lines: list[str]) -> list[str]:
    """Mark as literal (``::``) an indented block that follows a blank line after a paragraph of
    prose (code or formulas written as plain text); not one after ``::``, a directive or a list."""
    out: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(" ") and line.strip() and i >= 2 and not lines[i - 1].strip():
            previous = next((p for p in reversed(lines[: i - 1]) if p.strip()), "")
            starts = previous.lstrip()[:2]
            if not (previous.startswith(" ") or previous.rstrip().endswith("::") or starts in {"..", "* ", "- "}):
                out += ["::", ""]
        out.append(line)
    return out


def _docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """Google-style docstrings to reStructuredText (napoleon's parser, with the rules above)."""
    if what in {"data", "attribute"} and lines and "\n".join(lines).strip() == (type(obj).__doc__ or "").strip():
        lines[:] = []  # a constant without a docstring of its own, not its type's (dict, tuple, ...)
    if what == "class" and lines and lines[0].startswith(f"{getattr(obj, '__name__', '')}("):
        lines[:] = []  # the signature a dataclass without a docstring gets as one
    lines[:] = [_plain_text(line) if ("|" in line or "*" in line or "``" in line) else line for line in lines]
    as_what = "method" if what in {"attribute", "data", "property"} else what
    lines[:] = _literal_blocks(lines)
    config = _NAPOLEON_NAMED if _names_returns(lines) else _NAPOLEON
    lines[:] = GoogleDocstring(lines, config, app, as_what, name, obj, options).lines()


def _public_modules() -> list[str]:
    """natural_tangents and every module under it whose dotted path has no part starting with '_'."""
    names = ["natural_tangents"]
    for info in pkgutil.walk_packages(natural_tangents.__path__, "natural_tangents."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _is_data(obj: object) -> bool:
    return not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj))


def _page(name: str, children: list[str]) -> str:
    """The page of one module: its docstring and members. A package's page also lists its public
    names (its ``__all__``; classes and functions are documented in the modules that define them,
    data here) and its submodules."""
    module = importlib.import_module(name)  # the module itself, even where a function shadows its name
    title = name.replace("_", r"\_")
    lines = [title, "=" * len(title), "", f".. automodule:: {name}"]
    if not children:
        return "\n".join(lines) + "\n"
    lines += ["   :ignore-module-all:", ""]
    public = list(getattr(module, "__all__", []))
    if public:
        lines += [".. rubric:: Public names", "", ".. autosummary::", ""] + [f"   {n}" for n in public] + [""]
    for n in public:
        if _is_data(getattr(module, n)):
            lines += [f".. autodata:: {n}", "   :no-value:", ""]
    lines += [".. rubric:: Submodules", "", ".. toctree::", "   :maxdepth: 1", ""]
    lines += [f"   {child}" for child in children]
    return "\n".join(lines) + "\n"


def _write_api_pages(app) -> None:
    """docs/api/<module>.rst for every public module, rewritten at every build (a renamed module
    leaves no stale page)."""
    out = Path(app.srcdir) / "api"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    names = _public_modules()
    for name in names:
        children = [n for n in names if n.rsplit(".", 1)[0] == name and n != name]
        (out / f"{name}.rst").write_text(_page(name, children), encoding="utf-8")


def _lookup(dotted: str) -> tuple[bool, object]:
    """(found, object) for a dotted name: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        except AttributeError:
            return False, None
        return True, obj
    return False, None


def _canonical(obj: object) -> str | None:
    """Where autodoc documents ``obj``: its defining module and qualified name (None for data)."""
    if inspect.ismodule(obj):
        return obj.__name__
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        obj = obj.fget
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return None
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if module and qualname else None


def _documented_as(env, obj: object, last: str) -> list[str]:
    """Documented names ending in ``.last`` that are ``obj`` (for data, which has no __module__)."""
    names = []
    for full in env.get_domain("py").objects:
        if full.rsplit(".", 1)[-1] == last and full.startswith("natural_tangents."):
            found, candidate = _lookup(full)
            if found and candidate is obj:
                names.append(full)
    return names


def _resolve_alias(app, env, node, contnode):
    """Resolve what the Python domain did not: a public alias (``natural_tangents.fisher.Exact``
    for ``natural_tangents.fisher.exact.Exact``) or a name relative to the current module or class
    is imported and looked up where it is documented; a name from another library, a builtin or a
    type variable is left as plain text. A name of natural_tangents that is not documented (a
    private function, a misspelling) still warns, and -W fails the build."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__"):
        return contnode  # a private helper named in a docstring: not part of the reference
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = []
    if module:
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
        parts = module.split(".")
        candidates += [".".join([*parts[:i], target]) for i in range(len(parts), 0, -1)]
    candidates.append(target)
    domain = env.get_domain("py")
    for name in candidates:
        found, obj = _lookup(name)
        if not found:
            continue
        if isinstance(obj, typing.TypeVar):
            return contnode
        canonical = _canonical(obj)
        if canonical is not None and not canonical.startswith("natural_tangents."):
            return contnode  # another library (also when reached through a module's import)
        if canonical is None and not _is_data(obj):
            return None
        where = [canonical] if canonical else _documented_as(env, obj, target.rsplit(".", 1)[-1])
        if canonical is None and not where:
            if not name.startswith("natural_tangents."):
                return contnode  # data of another library
            continue  # data seen through a module's import: try the next reading of the name
        for full in where:
            for reftype in (node["reftype"], "obj"):
                resolved = domain.resolve_xref(env, node["refdoc"], app.builder, reftype, full, node, contnode)
                if resolved is not None:
                    return resolved
        return None  # part of natural_tangents but not documented: the warning stands
    if target.split(".")[0] in vars(builtins) or target in {"None", "True", "False"}:
        return contnode
    # Last: a name written through a module alias (``_losses.Loss`` for ``from .. import losses as
    # _losses``) or a method named without its class: the one documented object of that name.
    last = target.rsplit(".", 1)[-1]
    matches = [full for full in domain.objects if full.rsplit(".", 1)[-1] == last]
    if len(matches) > 1 and module:  # several: the one in the current module, if it is one
        matches = [full for full in matches if full.startswith(f"{module}.")]
    if len(matches) == 1:
        return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", matches[0], node, contnode)
    return None


def setup(app) -> None:
    app.connect("builder-inited", _write_api_pages)
    app.connect("autodoc-process-docstring", _docstring)
    app.connect("missing-reference", _resolve_alias)
