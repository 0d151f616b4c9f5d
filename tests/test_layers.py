"""Import arrows point one way: the base package (core/, installed as ``tokscale``) and data/ at the bottom;
tokenizers/ and autoregressive/ above them; jobs/ and the command-line modules (``*cli.py``) on top.

Parsed from the source (every ``import`` and ``from ... import``, relative ones resolved, inside functions too),
so a lazy import inside a function counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> package name it installs as (pyproject.toml's package-dir)
PACKAGES = {
    "core": "tokscale",
    "data": "tokscale.data",
    "tokenizers": "tokscale.tokenizers",
    "autoregressive": "tokscale.autoregressive",
    "jobs": "tokscale.jobs",
}
ABOVE_BASE = ("tokscale.tokenizers", "tokscale.autoregressive", "tokscale.jobs")
LAUNCHERS = ("tokscale.jobs",)


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def modules(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT / folder).with_suffix("")
        package = ".".join([PACKAGES[folder], *rel.parts[:-1]])
        yield path, package


def violations(folders: tuple[str, ...], forbidden: tuple[str, ...], skip_cli: bool = False) -> list[str]:
    bad = []
    for folder in folders:
        for path, package in modules(folder):
            if skip_cli and path.name.endswith("cli.py"):
                continue
            for line, name in imports_of(path, package):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_the_base_package_and_data_import_no_trainer_and_no_launcher():
    assert violations(("core", "data"), ABOVE_BASE) == []


def test_model_families_import_no_launcher_outside_their_command_line_modules():
    assert violations(("tokenizers", "autoregressive"), LAUNCHERS, skip_cli=True) == []


@pytest.mark.parametrize(
    "source, package, found",
    [
        ("from tokscale.tokenizers.model import X", "tokscale", "tokscale.tokenizers.model"),
        ("def f():\n    from ..jobs import local", "tokscale.tokenizers", "tokscale.jobs"),
        ("import tokscale.jobs.cli as c", "tokscale", "tokscale.jobs.cli"),
        ("from tokscale import jobs", "tokscale", "tokscale.jobs"),
    ],
)
def test_the_checker_sees_top_level_lazy_relative_and_attribute_imports(tmp_path, source, package, found):
    path = tmp_path / "m.py"
    path.write_text(source + "\n")
    assert found in [name for _, name in imports_of(path, package)]
