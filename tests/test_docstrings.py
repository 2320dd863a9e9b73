"""Every public name documents itself in one convention (numpy style), so the generated API reference
(docs/hooks/gen_pages.py) shows a parameter table for each: functions and classes of
``trackin_ooc.__all__`` have a Parameters section naming every parameter, functions that return
something a Returns section."""

from __future__ import annotations

import inspect
import re

import pytest

import trackin_ooc as to

PUBLIC = [n for n in to.__all__ if not n.startswith("__")]


def _documented(obj: object) -> tuple[str, object]:
    """(docstring, callable whose signature it documents): a class documents its constructor."""
    if inspect.isclass(obj):
        return inspect.getdoc(obj) or "", obj.__init__
    return inspect.getdoc(obj) or "", obj


def _section(doc: str, title: str) -> str | None:
    """The body of a numpy-style section, or None when there is none."""
    match = re.search(rf"^{title}\n-{{{len(title)}}}\n(.*?)(?=^\w[\w ]*\n-{{3,}}\n|\Z)", doc, re.S | re.M)
    return match.group(1) if match else None


def _named(section: str) -> set[str]:
    """Parameter names a Parameters section documents (``a, b : type`` documents both)."""
    names: set[str] = set()
    for line in section.splitlines():
        if line and not line[0].isspace():
            head = line.split(" : ")[0]
            names.update(n.strip().lstrip("*") for n in head.split(","))
    return names


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in PUBLIC
        if callable(getattr(to, n))
        and not (inspect.isclass(getattr(to, n)) and issubclass(getattr(to, n), BaseException))
    ],
)
def test_public_names_document_their_parameters(name):
    doc, fn = _documented(getattr(to, name))
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self" and not p.name.startswith("_") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not params:
        return
    section = _section(doc, "Parameters")
    assert section is not None, f"{name}: no 'Parameters' section in its docstring"
    missing = [p.name for p in params if p.name not in _named(section)]
    assert not missing, f"{name}: the Parameters section does not name {missing}"


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isfunction(getattr(to, n))])
def test_public_functions_say_what_they_return(name):
    fn = getattr(to, name)
    annotation = inspect.signature(fn).return_annotation
    if annotation in (None, "None"):
        return
    assert _section(inspect.getdoc(fn) or "", "Returns") is not None, f"{name}: no 'Returns' section"
