"""Counts the README states are checked against what they count, so the README cannot drift from the code;
and the install command it names does what it says."""

import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from explainer.chunking import chunk_file

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def number_before(phrase: str) -> int:
    """The number written just before `phrase` in the README ("(16 pieces and the introduction)")."""
    assert phrase in README, f"the README no longer says {phrase!r}"
    words = README[:README.index(phrase)].replace("(", " ").split()
    return int(words[-1].replace(",", ""))


def test_the_make_run_post_has_as_many_pieces_as_the_readme_says():
    chunked = chunk_file(ROOT / "llama_ref/generation.py", symbol="Llama.generate", max_lines=30)
    assert number_before("pieces and the introduction)") == len(chunked.chunks)


def test_the_eval_set_has_as_many_pieces_as_the_readme_says():
    pieces = tomllib.loads((ROOT / "benchmarks/eval_set/pieces.toml").read_text(encoding="utf-8"))["piece"]
    assert number_before("pieces of\n`benchmarks/eval_set/pieces.toml`") == len(pieces)


@pytest.mark.parametrize("options, index", [
    ([], None),
    (["TORCH=cpu"], "https://download.pytorch.org/whl/cpu"),
    (["TORCH_INDEX=https://example.invalid/simple"], "https://example.invalid/simple"),
])
def test_make_install_takes_torch_from_the_index_the_user_chose(tmp_path, options, index):
    """`make -n` prints the install commands without running them: torch comes pinned, first, and from
    PyTorch's CPU index only when asked."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    plan = subprocess.run([make, "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", *options], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    torch_line = next(line for line in plan.splitlines() if "install torch==" in line)
    assert plan.index(torch_line) < plan.index("install -e")
    assert torch_line.rstrip().endswith(f"--index-url {index}") if index else "--index-url" not in torch_line
