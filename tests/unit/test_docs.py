"""docs/design.md's modules table names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_modules_table_names_every_module_and_nothing_else() -> None:
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = design[design.index("## Modules") : design.index("\n## ", design.index("## Modules") + 1)]
    named = set(re.findall(r"`(worker/[\w/.*]+)`", table))
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "worker").rglob("*.py")
        if p.name != "__init__.py" or p.parent == ROOT / "worker"
    }
    lua = {str(p.relative_to(ROOT)) for p in (ROOT / "worker").rglob("*.lua")}
    assert modules - named == set(), "modules missing from docs/design.md's table"
    globbed = {n for n in named if "*" in n}
    assert all(any(Path(f).match(g) for g in globbed) for f in lua), "scripts missing from the table"
    assert named - modules - globbed == set(), "the table names modules that do not exist"
