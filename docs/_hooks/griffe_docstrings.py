"""Griffe extension: read two habits of kure_jax's Google-style docstrings as napoleon does.

mkdocstrings (through griffe) parses Google-style docstrings, but not quite as Sphinx's napoleon:

- ``a, b: text`` in ``Args:`` documents several parameters at once; griffe reads one parameter
  named "a, b" and warns that it is not in the signature. Here it becomes one entry per name.
- A doctest (``>>>`` lines) outside an ``Examples:`` section is plain Markdown to griffe: the
  prompts turn into a block quote and a printed list such as ``['a'] ['b']`` into a link. Here
  each run of doctest lines is fenced as ``pycon`` code.

The docstrings in the code are left as they are; only the text the reference renders changes.
"""

from __future__ import annotations

import re

import griffe

_PARAM_SECTIONS = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Attributes|Keyword Args|Keyword Arguments"
    r"|Other Parameters):\s*$"
)
_MULTI_ENTRY = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(.*)$")
_EXAMPLES = re.compile(r"^\s*Examples?:\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_multi_params(text: str) -> str:
    """Rewrites ``a, b: text`` entries of parameter sections as one entry per name."""
    lines = text.split("\n")
    out: list[str] = []
    section_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _PARAM_SECTIONS.match(line)
        if header:
            section_indent = len(header.group(1))
        elif line.strip() and section_indent is not None and _indent(line) <= section_indent:
            section_indent = None
        entry = _MULTI_ENTRY.match(line) if section_indent is not None else None
        if entry and len(entry.group(1)) > section_indent:
            indent, names, annotation, rest = entry.groups()
            body = [rest]
            j = i + 1
            while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > len(indent)):
                if not lines[j].strip() and (
                    j + 1 >= len(lines) or _indent(lines[j + 1]) <= len(indent)
                ):
                    break
                body.append("\n" + lines[j])
                j += 1
            for name in (n.strip() for n in names.split(",")):
                out.append(f"{indent}{name}{annotation or ''}:{''.join(body)}")
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def fence_doctests(text: str) -> str:
    """Fences each run of ``>>>`` lines (and their output) outside an Examples section."""
    lines = text.split("\n")
    out: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _EXAMPLES.match(line):  # griffe renders these itself
            out.extend(lines[i:])
            break
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and line.lstrip().startswith(">>>"):
            indent = " " * _indent(line)
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            out += [f"{indent}```pycon", *lines[i:j], f"{indent}```"]
            i = j
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class NapoleonHabits(griffe.Extension):
    """Applies :func:`split_multi_params` and :func:`fence_doctests` to every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(split_multi_params(obj.docstring.value))
