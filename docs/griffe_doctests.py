"""A griffe extension for the API reference: the `>>>` examples in unicon_tf's docstrings
become Python console code blocks.

unicon_tf's docstrings write their runnable examples as doctest lines (checked by
`python -m doctest`-style tools and read in a terminal as they are). Markdown would read a
doctest line such as `>>> info["heads"]["task"]` as text with reference links; this wraps
each run of `>>>` / `...` lines and the output that follows (up to a blank line) in a
fenced `pycon` block, so the reference shows the example as code.

Loaded by `mkdocs.yml` (`plugins: mkdocstrings: handlers: python: options: extensions`).
"""

import griffe


def fence_doctests(text: str) -> str:
    """`text` with each doctest example (a `>>>` line, its `...` continuations and its
    output, up to a blank line or the end) inside a ```pycon fence at its indentation.

    Example:
    >>> fence_doctests("Example:\\n>>> 1 + 1\\n2\\n\\nMore.").splitlines()
    ['Example:', '```pycon', '>>> 1 + 1', '2', '```', '', 'More.']
    """
    lines, out, inside, indent = text.splitlines(), [], False, ""
    for line in lines:
        stripped = line.lstrip()
        if not inside and stripped.startswith(">>>"):
            inside, indent = True, line[:len(line) - len(stripped)]
            out.append(f"{indent}```pycon")
        elif inside and not stripped:
            inside = False
            out.append(f"{indent}```")
        out.append(line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fence the doctest examples of every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
