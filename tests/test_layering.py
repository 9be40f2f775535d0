"""DESIGN invariant 7: cir_kernels/ and cir_sandbox/ stand alone - they import nothing from cir/."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["cir_kernels", "cir_sandbox"])
def test_standalone_packages_do_not_import_cir(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = {f.name: sorted(m for m in imported_modules(f) if m == "cir" or m.startswith("cir."))
                 for f in files}
    assert not {k: v for k, v in offenders.items() if v}, f"{package}/ imports cir: {offenders}"


def test_sandbox_imports_only_stdlib_and_seccomp():
    import sys

    allowed = set(sys.stdlib_module_names) | {"cir_sandbox", "pyseccomp", "seccomp"}
    for f in sorted((ROOT / "cir_sandbox").rglob("*.py")):
        top = {m.split(".")[0] for m in imported_modules(f)}
        # warm modules (numpy, sympy) are imported by name at run time, never by an import statement
        assert top <= allowed, f"{f.name} imports {sorted(top - allowed)}"


def test_library_modules_do_not_import_the_command_lines():
    """`python -m cir.evaluate` / `cir.generate` sit on top: no module under cir/ imports them (the
    trainer's evaluation goes through cir.eval and cir.rl.evaluation)."""
    commands = {"cir.evaluate", "cir.generate"}
    offenders = {str(f.relative_to(ROOT)): sorted(imported_modules(f) & commands)
                 for f in sorted((ROOT / "cir").rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, f"library modules import a command line: {offenders}"
