"""The house rules of the two packages, read from their source: llama_ref never imports explainer, the chat
template sandbox's child imports no llama_ref at all, and no comment or docstring carries a measurement
(numbers go to benchmarks/results, where they can be rerun)."""

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# Words that only a measurement log uses: a CPU's name, a speed, a throughput.
MEASUREMENT_WORDS = ("Zen", "tok/s", "GFLOPS")
# llama2.c's last line, which `python -m llama_ref` prints too: an output format, not a measurement.
OUTPUT_LABEL = '"achieved tok/s"'


def imported_packages(source: str, module: str) -> set[str]:
    """The top-level packages that the module `module` (module_name()) of this source imports, statically
    (import, from-import, relative ones resolved) or by a literal name (importlib.import_module, __import__)."""
    package = module.split(".")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((node.module or "").split(".")[0])
            else:
                base = package[: len(package) - node.level]  # the package `from .` or `from ..` means
                names = base + (node.module.split(".") if node.module else [])
                found.update([names[0]] if names else [alias.name for alias in node.names])
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                isinstance(node.func, ast.Name)
                and node.func.id == "__import__"
                or isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
            )
        ):
            found.add(node.args[0].value.split(".")[0])
    return found


def module_name(path: Path) -> str:
    """The file's dotted name, a package's __init__ included, so that `from . import x` resolves in it."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


@pytest.mark.parametrize(
    "source, module, expected",
    [
        ("import explainer.cli", "llama_ref.serve", {"explainer"}),
        ("from explainer.errors import UserError", "llama_ref.serve", {"explainer"}),
        ("def f():\n    from explainer import cli\n", "llama_ref.serve", {"explainer"}),
        ("from .. import explainer", "llama_ref.serve", {"explainer"}),
        ("from . import engine", "llama_ref.serve", {"llama_ref"}),
        ("from . import engine", "llama_ref.__init__", {"llama_ref"}),
        ("import importlib\nimportlib.import_module('explainer.cli')", "llama_ref.serve", {"importlib", "explainer"}),
        ("__import__('explainer')", "llama_ref.serve", {"explainer"}),
        ("import os, torch.nn as nn", "llama_ref.model", {"os", "torch"}),
    ],
)
def test_imports_are_found_however_they_are_written(source, module, expected):
    assert imported_packages(source, module) == expected


def test_no_module_of_llama_ref_imports_explainer():
    """llama_ref stands alone: explainer builds on it, never the other way round."""
    paths = sorted((ROOT / "llama_ref").rglob("*.py"))
    assert len(paths) > 10
    importers = [
        module_name(path)
        for path in paths
        if "explainer" in imported_packages(path.read_text(encoding="utf-8"), module_name(path))
    ]
    assert importers == []


def test_the_chat_templates_sandbox_child_imports_no_llama_ref_module():
    """The child process that renders chat templates runs llama_ref/chat.py alone, isolated (-I): whatever
    llama_ref is installed, if any, is not the code beside it, so the child must not import the package."""
    from llama_ref import chat

    child = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", chat.__file__], input=b"", capture_output=True, timeout=120
    )
    assert child.returncode == 0 and child.stdout == b"ready\n", child.stderr.decode()[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in child.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "jinja2.sandbox" in imported
    assert sorted(name for name in imported if name.split(".")[0] == "llama_ref") == []


def prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a Python source."""
    found = [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring is not None:
                found.append((node.body[0].lineno, docstring))
    return found


def measurements(source: str) -> list[tuple[int, str]]:
    return sorted(
        (line, text)
        for line, text in prose(source)
        if any(word in text.replace(OUTPUT_LABEL, "") for word in MEASUREMENT_WORDS)
    )


def test_a_measurement_in_a_comment_or_a_docstring_is_found():
    source = (
        '"""Fast."""\n\ndef f():\n    """Runs at 60 tok/s."""\n    x = 1  # 2x faster on Zen 5\n'
        '    return "tok/s"  # prints the label\n\n\ndef main():\n    """Ends with "achieved tok/s"."""\n'
    )
    assert [line for line, _text in measurements(source)] == [4, 5]


def test_no_comment_or_docstring_carries_a_measurement():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("llama_ref", "explainer")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, _text in measurements(path.read_text(encoding="utf-8"))
    ]
    assert found == []
