"""The package boundaries of docs/design.md hold. Run: pytest tests/test_layering.py"""

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


def module_imports(path: Path) -> set[str]:
    """Full dotted names of every module one file imports (also lazily)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_commands_do_not_import_the_study():
    """The demo study lives in pipelines/demo/; only the CLI's `demo` command reaches into it."""
    for path in (ROOT / "pipelines").glob("*.py"):
        if path.name == "cli.py":
            continue
        assert not any(name.startswith("pipelines.demo") for name in module_imports(path)), path


def test_the_shard_contract_has_one_home():
    """Commands call scoring/shards/ for metadata, Parquet writing and manifests; they never do it themselves."""
    contract_internals = ("METADATA_KEY", "ParquetWriter", "write_table", "build_manifest", "write_json_atomic", "replace_schema_metadata")
    for path in [*(ROOT / "pipelines").rglob("*.py"), *(ROOT / "training").glob("*.py"), ROOT / "scoring" / "frames.py"]:
        text = path.read_text()
        assert not [name for name in contract_internals if name in text], path
    assert "pipelines.score" not in module_imports(ROOT / "pipelines" / "reweight.py")


def test_every_module_reads_in_one_sitting():
    """No file under scoring/, training/ or pipelines/ is longer than about 450 lines."""
    for package in ("scoring", "training", "pipelines"):
        for path in (ROOT / package).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 460, path
