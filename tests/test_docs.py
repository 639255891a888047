"""The manual (docs/, mkdocs.yml) builds strictly: a broken link, anchor, nav entry or API
reference (a docstring mkdocstrings cannot read) fails the build, and so this test."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_manual_builds_strictly(tmp_path, monkeypatch):
    for module in ("mkdocs", "mkdocstrings", "material"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.chdir(ROOT)  # mkdocs.yml's paths (docs/, the griffe extension) are relative to the repository
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    build(config)  # raises mkdocs' Abort on the first build with warnings in strict mode
    api = (tmp_path / "site" / "api" / "components" / "index.html").read_text()
    assert "pipeline_graph" in api and '<span class="gp">&gt;&gt;&gt; </span>' in api  # doctests as console code
    assert (tmp_path / "site" / "scale" / "index.html").exists()


def test_doctest_examples_become_code_blocks():
    pytest.importorskip("griffe", reason="the docs extra is not installed: pip install -e '.[docs]'")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from griffe_doctests import fence_doctests
    finally:
        sys.path.remove(str(ROOT / "docs"))
    text = "Example:\n>>> x = [1]\n>>> x[0]\n1\n\nAfter.\n    >>> y\n    ... z"
    assert fence_doctests(text).splitlines() == [
        "Example:", "```pycon", ">>> x = [1]", ">>> x[0]", "1", "```", "", "After.",
        "    ```pycon", "    >>> y", "    ... z", "    ```"]
