"""The package boundaries of DESIGN.md hold. Run: pytest tests/test_layering.py"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> set[str]:
    """Top-level names of every module imported anywhere in the package's source (also lazily, inside functions)."""
    names = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_scoring_never_imports_training_or_pipelines():
    assert {"training", "pipelines"}.isdisjoint(imported_modules("scoring"))


def test_training_never_imports_pipelines():
    assert "pipelines" not in imported_modules("training")


def test_importing_scoring_loads_no_training_and_no_optional_dependency():
    code = (
        "import sys, scoring.shards, scoring.stats, scoring.hf_backend;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('training', 'pipelines', 'vllm', 'matplotlib', 'trl')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
