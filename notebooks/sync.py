"""Write each notebook's ``.ipynb`` from its jupytext ``.py`` (the source of truth), outputs stripped.

    python notebooks/sync.py          # rewrite notebooks/0*.ipynb from notebooks/0*.py
    python notebooks/sync.py --check  # exit 1 if any .ipynb is out of sync or has outputs (as the tests check)

Edit the ``.py`` files (or edit in Jupyter with jupytext installed: the pairing in each file's header keeps
both in step), then run this before committing. Cell ids are derived from the cell contents, so an
unchanged cell keeps its id and diffs stay small.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent


def notebook_sources() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.py"))


def build(py: Path) -> nbformat.NotebookNode:
    """The stripped notebook for ``py``: cells from jupytext, no outputs, content-derived cell ids."""
    nb = jupytext.read(py)
    seen: dict[str, int] = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:8]
        seen[digest] = seen.get(digest, 0) + 1
        cell["id"] = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
        if cell.cell_type == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def problems(py: Path) -> list[str]:
    """Why ``py``'s committed ``.ipynb`` is not what :func:`build` makes of it (empty when in sync).

    Compares what matters (cell types and sources, no outputs, the pairing), not bytes, so a different
    jupytext or nbformat version does not count as a difference.
    """
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        return [f"{ipynb.name} is missing"]
    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    out = []
    want = [(c.cell_type, c.source) for c in jupytext.read(py).cells]
    have = [(c.cell_type, c.source) for c in nb.cells]
    if want != have:
        diff = next((i for i, (w, h) in enumerate(zip(want, have)) if w != h), min(len(want), len(have)))
        out.append(f"{ipynb.name}: cells differ from {py.name} from cell {diff} on "
                   f"({len(have)} cells vs {len(want)})")
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None):
            out.append(f"{ipynb.name}: cell {i} has outputs or an execution count (commit notebooks stripped)")
    formats = nb.metadata.get("jupytext", {}).get("formats", "")
    if "ipynb" not in formats or "py:percent" not in formats:
        out.append(f"{ipynb.name}: not paired with its .py (metadata.jupytext.formats={formats!r})")
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = [p for py in notebook_sources() for p in problems(py)]
        for p in found:
            print(p)
        if found:
            print("run: python notebooks/sync.py")
        return 1 if found else 0
    for py in notebook_sources():
        ipynb = py.with_suffix(".ipynb")
        text = render(build(py))
        if not ipynb.exists() or ipynb.read_text() != text:
            ipynb.write_text(text)
            print(f"wrote {ipynb.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
