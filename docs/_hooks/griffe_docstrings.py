"""Griffe extension: read kure_jax's Google-style docstrings as Sphinx's napoleon would.

mkdocstrings (through griffe) parses Google-style docstrings as Markdown, not reStructuredText:

- ``a, b: text`` in ``Args:`` documents several parameters at once; griffe reads one parameter
  named "a, b" and warns that it is not in the signature. Here it becomes one entry per name.
- A doctest (``>>>`` lines) outside an ``Examples:`` section is plain Markdown to griffe: the
  prompts turn into a block quote and a printed list such as ``['a'] ['b']`` into a link. Here
  each run of doctest lines is fenced as ``pycon`` code.
- Sphinx roles (``:func:`penalty```, ``:class:`~a.B```) become inline code (``penalty``, ``B``):
  most of their targets are private modules that the reference does not show.
- A ``.. math::`` directive becomes a ``$$ ... $$`` block, typeset by MathJax (arithmatex).
- A paragraph ending in ``::`` (reST: an indented literal block follows) ends in ``:``; the
  indented block is already a Markdown code block.

The docstrings in the code are left as they are; only the text the reference renders changes.
"""

from __future__ import annotations

import re

try:
    from griffe import Extension
except ImportError:  # the main test suite imports the rewrites without the docs requirements
    Extension = object

_PARAM_SECTIONS = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Attributes|Keyword Args|Keyword Arguments"
    r"|Other Parameters):\s*$"
)
_MULTI_ENTRY = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(.*)$")
_EXAMPLES = re.compile(r"^\s*Examples?:\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc|const):`~?([^`]+)`")
_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


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


def roles_to_code(text: str) -> str:
    """Rewrites Sphinx roles as inline code; ``~a.b.c`` keeps its last part, as Sphinx shows it."""

    def code(match: re.Match) -> str:
        target = match.group(1)
        if match.group(0).split("`")[1].startswith("~"):
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return _ROLE.sub(code, text)


def math_blocks(text: str) -> str:
    """Rewrites each ``.. math::`` directive (and its indented body) as a ``$$`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        directive = _MATH.match(lines[i])
        if not directive:
            out.append(lines[i])
            i += 1
            continue
        indent, first = directive.groups()
        body = [first] if first.strip() else []
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > len(indent)):
            body.append(lines[j].strip())
            j += 1
        while body and not body[-1]:  # the blank lines that end the directive stay outside
            body.pop()
            j -= 1
        out += [f"{indent}$$", *(f"{indent}{line}" for line in body if line), f"{indent}$$"]
        i = j
    return "\n".join(out)


def literal_markers(text: str) -> str:
    """Drops the second colon of a reST ``text::`` marker (a lone ``::`` line goes)."""
    out = []
    for line in text.split("\n"):
        if line.rstrip().endswith("::") and not _MATH.match(line):
            stripped = line.rstrip()[:-2].rstrip()
            if not stripped:
                continue
            line = f"{stripped}:" if not stripped.endswith(":") else stripped
        out.append(line)
    return "\n".join(out)


def rewrite(text: str) -> str:
    """Every rewrite, in the order that keeps each from seeing the others' output."""
    text = math_blocks(roles_to_code(split_multi_params(text)))
    return fence_doctests(literal_markers(text))


class NapoleonHabits(Extension):
    """Applies :func:`rewrite` to every docstring."""

    def on_instance(self, *, obj, **kwargs) -> None:
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
