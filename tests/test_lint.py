"""The tree as a whole: every Python file compiles and passes ruff, and the committed
model.toml is the one the training script writes.

The suite imports service/ and tests/, but tools/ is scripts that need torch (never
installed for the suite), so a syntax error there would otherwise surface only when
someone next trains or benchmarks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("service", "tools", "tests", "scripts")


def _python_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_python_file_compiles() -> None:
    files = _python_files()
    assert any(p.parts[-2:] == ("tools", "train_demo_model.py") for p in files)
    failures = []
    for path in files:
        try:
            compile(path.read_bytes(), str(path.relative_to(ROOT)), "exec", dont_inherit=True)
        except SyntaxError as e:
            failures.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert not failures, failures


def test_ruff_finds_nothing() -> None:
    # ruff is in the test extra; without it this fails with "No module named ruff".
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *FOLDERS],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _constants(path: Path, names: tuple[str, ...]) -> dict[str, object]:
    """The module-level assignments to ``names``, evaluated without importing the module
    (train_demo_model imports torch)."""
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id in names for t in node.targets)]
    namespace: dict[str, object] = {}
    # Only the script's own string assignments run, never its imports.
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in names}


def test_committed_model_toml_is_what_training_writes() -> None:
    script = _constants(ROOT / "tools" / "train_demo_model.py",
                        ("_WARNING", "_DESCRIPTION", "MODEL_TOML"))
    assert script["MODEL_TOML"] == (ROOT / "models" / "demo-cxr" / "model.toml").read_text()
