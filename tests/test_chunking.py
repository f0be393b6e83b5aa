"""Chunking: real tree-sitter on real and generated code.

The property tests hold the promise every later stage relies on: chunks are whole lines of the
original text, in order, without gaps or overlap, so they add up to the source byte for byte.
"""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from explainer.chunking import (
    CHUNK_KINDS,
    CODE_LANGUAGES,
    chunk_file,
    chunk_source,
    detect_code_language,
    enclosing_view,
)
from explainer.errors import UserError

REPO = Path(__file__).parent.parent
GENERATE_FIXTURE = REPO / "tests" / "data" / "generation_upstream.py"
PROPERTY = settings(max_examples=150, deadline=None)


def assert_exact(chunked, expected_text, first_line=1):
    """Chunks are whole lines, contiguous and increasing, and add up to `expected_text`."""
    lines = expected_text.split("\n")
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    assert "".join(chunk.code for chunk in chunked.chunks) == expected_text
    next_line = first_line
    for chunk in chunked.chunks:
        assert chunk.start_line == next_line
        assert chunk.end_line >= chunk.start_line
        assert chunk.code == "".join(lines[chunk.start_line - first_line : chunk.end_line - first_line + 1])
        assert chunk.kind in CHUNK_KINDS
        assert chunk.symbol == "" or chunk.symbol in {s.name for s in chunked.symbols}
        assert set(chunk.calls) <= {s.name for s in chunked.symbols}
        next_line = chunk.end_line + 1
    assert next_line == first_line + len(lines)


def first_code_line(code, comment_starts=("#",)):
    """The chunk's first line that is neither blank nor a comment, without indentation."""
    for line in code.split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith(comment_starts):
            return stripped
    return ""


# --- the seed post's generate() --------------------------------------------------------------


def fixture_line(text):
    """1-based number of the fixture's line that starts with `text` after indentation."""
    lines = GENERATE_FIXTURE.read_text().split("\n")
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(text))


def test_generate_is_split_the_way_the_seed_post_walks_through_it():
    chunked = chunk_file(GENERATE_FIXTURE, symbol="Llama.generate")
    generate = next(s for s in chunked.symbols if s.name == "Llama.generate")
    assert_exact(chunked, generate.text, first_line=generate.start_line)
    chunks = chunked.chunks

    signature = chunks[0]
    assert signature.kind == "signature"
    assert signature.code.lstrip().startswith("@torch.inference_mode()\n    def generate(")
    assert signature.code.rstrip().endswith(") -> Tuple[List[List[int]], Optional[List[List[float]]]]:")

    loop = next(c for c in chunks if c.code.lstrip().startswith("for cur_pos in range("))
    assert loop.kind == "for"
    assert loop.start_line == fixture_line("for cur_pos in range(min_prompt_len, total_len):")
    assert "break" in loop.code.rstrip().split("\n")[-1]
    assert loop.calls == ("sample_top_p",)

    assert chunks[-1].code.rstrip().endswith("return (out_tokens, out_logprobs if logprobs else None)")
    assert all(c.symbol == "Llama.generate" for c in chunks)
    # blank lines separate the opening groups, as in the post
    assert first_code_line(chunks[1].code) == "params = self.model.params"
    assert first_code_line(chunks[2].code) == "min_prompt_len = min(len(t) for t in prompt_tokens)"


def test_whole_file_groups_imports_and_explains_each_definition_in_order():
    chunked = chunk_file(GENERATE_FIXTURE)
    assert_exact(chunked, GENERATE_FIXTURE.read_text())
    assert [s.name for s in chunked.symbols] == ["Llama", "Llama.__init__", "Llama.generate", "sample_top_p"]
    assert [s.kind for s in chunked.symbols] == ["class", "method", "method", "function"]
    imports = chunked.chunks[0]
    assert imports.kind == "imports"
    assert "from typing import" in imports.code and "import torch.nn.functional as F" in imports.code
    assert chunked.chunks[1].kind == "signature" and chunked.chunks[1].symbol == "Llama"
    assert chunked.chunks[1].code.startswith('class Llama:\n    """A model and its tokenizer."""\n')
    assert (chunked.chunks[2].kind, chunked.chunks[2].symbol) == ("function", "Llama.__init__")
    assert (chunked.chunks[-1].kind, chunked.chunks[-1].symbol) == ("function", "sample_top_p")
    assert chunked.warnings == []


def test_symbols_carry_signature_docstring_and_text():
    chunked = chunk_file(GENERATE_FIXTURE)
    by_name = {s.name: s for s in chunked.symbols}
    top_p = by_name["sample_top_p"]
    assert top_p.signature == "def sample_top_p(probs, p):"
    assert top_p.docstring.startswith('"""Sample from the smallest set of tokens')
    assert top_p.text.startswith("def sample_top_p(probs, p):\n")
    assert top_p.text.endswith("return torch.gather(sorted_indices, -1, choice)\n")
    generate = by_name["Llama.generate"]
    assert generate.signature.startswith("    @torch.inference_mode()\n    def generate(\n")
    assert generate.signature.endswith("Optional[List[List[float]]]]:")
    assert generate.docstring == ""
    assert generate.start_line == fixture_line("@torch.inference_mode()")
    assert generate.end_line == fixture_line("return (out_tokens")


def test_long_loop_is_split_into_header_and_inner_statements():
    chunked = chunk_file(GENERATE_FIXTURE, symbol="Llama.generate", max_lines=10)
    assert_exact(
        chunked,
        next(s.text for s in chunked.symbols if s.name == "Llama.generate"),
        first_line=fixture_line("@torch.inference_mode()"),
    )
    loop_line = fixture_line("for cur_pos in range(min_prompt_len, total_len):")
    header = next(c for c in chunked.chunks if c.start_line == loop_line)
    assert header.kind == "for"
    assert header.code.strip().split("\n")[-1].strip().startswith("logits = self.model.forward(")
    sampling = next(c for c in chunked.chunks if first_code_line(c.code) == "if temperature > 0:")
    assert sampling.kind == "if"
    assert "else:" in sampling.code and sampling.calls == ("sample_top_p",)
    stop = next(c for c in chunked.chunks if first_code_line(c.code) == "if all(eos_reached):")
    assert stop.kind == "if"
    assert all(c.end_line - c.start_line < 10 for c in chunked.chunks)


def test_enclosing_view_numbers_the_symbol_and_marks_the_chunk():
    chunked = chunk_file(GENERATE_FIXTURE, symbol="Llama.generate")
    loop = next(c for c in chunked.chunks if c.kind == "for" and "cur_pos" in c.code)
    view = enclosing_view(chunked, loop).split("\n")
    generate = next(s for s in chunked.symbols if s.name == "Llama.generate")
    assert len(view) == generate.end_line - generate.start_line + 1
    marked = [line for line in view if line.startswith(">>")]
    assert len(marked) == loop.end_line - loop.start_line + 1
    assert marked[0].split("|", 1)[0].split() == [">>", str(loop.start_line)]
    assert marked[0].split("| ", 1)[1] == "        for cur_pos in range(min_prompt_len, total_len):"
    assert view[0].split()[:2] == [str(generate.start_line), "|"]


def test_module_level_view_is_the_chunk_alone():
    chunked = chunk_file(GENERATE_FIXTURE)
    imports = chunked.chunks[0]
    view = enclosing_view(chunked, imports).split("\n")
    assert len(view) == imports.end_line - imports.start_line + 1
    assert all(line.startswith(">>") for line in view)


PROJECT_SOURCES = sorted((REPO / "explainer").rglob("*.py")) + sorted((REPO / "llama_ref").rglob("*.py"))


@pytest.mark.parametrize("path", PROJECT_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_project_sources_chunk_exactly(path):
    source = path.read_text(encoding="utf-8")
    if not source.strip():
        pytest.skip("empty file")
    chunked = chunk_file(path)
    assert_exact(chunked, source)
    for symbol in chunked.symbols:
        if [s.name for s in chunked.symbols].count(symbol.name) == 1:
            assert_exact(chunk_file(path, symbol=symbol.name), symbol.text, symbol.start_line)


# --- placement rules on small hand-written inputs ----------------------------------------------


def kinds_and_lines(chunked):
    return [(c.kind, c.symbol, c.start_line, c.end_line) for c in chunked.chunks]


def test_imports_group_across_blank_lines_and_blank_lines_end_the_chunk_before():
    source = "import os\n\nimport sys\n\n\nLIMIT = 3\n\n\ndef helper():\n    return 1\n"
    chunked = chunk_source(source, "m.py", "python")
    assert kinds_and_lines(chunked) == [("imports", "", 1, 5), ("module", "", 6, 8), ("function", "helper", 9, 10)]


def test_comments_go_with_the_code_below_them():
    source = (
        "def f(items):\n"  # 1
        "    total = 0\n"  # 2
        "    # add them up\n"  # 3
        "    for item in items:\n"
        "        total += item\n"
        "    # done\n"  # 6: right under the loop, then a blank line
        "\n"
        "    # the answer\n"  # 8
        "    return total\n"
    )
    chunked = chunk_source(source, "m.py", "python", max_lines=3)
    assert kinds_and_lines(chunked) == [
        ("signature", "f", 1, 1),
        ("block", "f", 2, 2),
        ("for", "f", 3, 7),
        ("return", "f", 8, 9),
    ]


def test_long_if_gets_a_chunk_per_branch():
    source = (
        "def f(x):\n"
        "    if x > 1:\n"
        "        a = 1\n"
        "        b = 2\n"
        "    elif x > 0:\n"
        "        a = 3\n"
        "    else:\n"
        "        a = 4\n"
        "    return a\n"
    )
    chunked = chunk_source(source, "m.py", "python", max_lines=3)
    assert kinds_and_lines(chunked) == [
        ("signature", "f", 1, 1),
        ("if", "f", 2, 4),
        ("if", "f", 5, 6),
        ("if", "f", 7, 8),
        ("return", "f", 9, 9),
    ]


def test_calls_resolve_methods_through_self_and_functions_by_name():
    source = (
        "def helper():\n"
        "    return 1\n"
        "\n"
        "class Model:\n"
        "    def step(self):\n"
        "        return helper() + self.other() + len([])\n"
        "\n"
        "    def other(self):\n"
        "        return Model.step(self)\n"
    )
    chunked = chunk_source(source, "m.py", "python", max_lines=2)
    calls = {c.symbol: c.calls for c in chunked.chunks if c.calls}
    assert calls == {"Model.step": ("helper", "Model.other"), "Model.other": ("Model.step",)}


C_COMMENTS = ("//", "/*", "*")
C_SOURCE = """\
/* Inference for a tiny model in pure C */

#include <stdio.h>
#include <math.h>

typedef struct {
    int dim; // transformer dimension
    int n_layers;
} Config;

// softmax in place over x[0..size)
void softmax(float* x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++) {
        if (x[i] > max_val) {
            max_val = x[i];
        }
    }
    float sum = 0.0f;
    for (int i = 0; i < size; i++) {
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
}

int main(int argc, char *argv[]) {
    float logits[4] = {1, 2, 3, 4};
    // generate
    for (int pos = 0; pos < 8; pos++) {
        softmax(logits, 4);
        switch (pos) {
            case 0:
                printf("zero\\n");
                break;
            default:
                printf("more\\n");
        }
    }
    return 0;
}
"""


def test_c_file_structure():
    chunked = chunk_source(C_SOURCE, "run.c", "c", max_lines=8)
    assert_exact(chunked, C_SOURCE)
    assert chunked.warnings == []
    assert [(s.name, s.kind) for s in chunked.symbols] == [
        ("Config", "class"),
        ("softmax", "function"),
        ("main", "function"),
    ]
    softmax = chunked.symbols[1]
    assert softmax.signature == "void softmax(float* x, int size)"
    assert softmax.docstring == "// softmax in place over x[0..size)"
    assert chunked.chunks[0].kind == "imports" and "#include <math.h>" in chunked.chunks[0].code
    assert (chunked.chunks[1].kind, chunked.chunks[1].symbol) == ("class", "Config")
    opening = next(c for c in chunked.chunks if c.symbol == "softmax")
    assert opening.kind == "signature"
    assert opening.code == "// softmax in place over x[0..size)\nvoid softmax(float* x, int size) {\n"
    loop = next(c for c in chunked.chunks if "for (int pos" in c.code)
    assert loop.kind == "for" and loop.code.startswith("    // generate\n")
    assert loop.calls == ("softmax",)
    switch = next(c for c in chunked.chunks if first_code_line(c.code, C_COMMENTS).startswith("switch"))
    assert switch.kind == "switch" and switch.symbol == "main"
    assert chunked.chunks[-1].code.endswith("    return 0;\n}\n")


def test_cpp_methods_are_qualified_and_called_through_this():
    source = (
        "class Linear {\n"
        " public:\n"
        "  float forward(float x) {\n"
        "    return this->scale(x) + bias(x);\n"
        "  }\n"
        "  float scale(float x) { return x; }\n"
        "  float bias(float x) { return 0; }\n"
        "};\n"
    )
    chunked = chunk_source(source, "linear.cpp", "cpp", max_lines=3)
    assert_exact(chunked, source)
    assert [(s.name, s.kind) for s in chunked.symbols] == [
        ("Linear", "class"),
        ("Linear::forward", "method"),
        ("Linear::scale", "method"),
        ("Linear::bias", "method"),
    ]
    forward = next(c for c in chunked.chunks if c.symbol == "Linear::forward")
    assert forward.calls == ("Linear::scale", "Linear::bias")


def test_cuda_kernel_launch_parses_cleanly():
    source = (
        "__global__ void scale(float *x) {\n"
        "    x[threadIdx.x] *= 2;\n"
        "}\n"
        "\n"
        "int main() {\n"
        "    scale<<<1, 32>>>(0);\n"
        "    return 0;\n"
        "}\n"
    )
    chunked = chunk_source(source, "k.cu", "cuda")
    assert chunked.warnings == []
    assert [s.name for s in chunked.symbols] == ["scale", "main"]
    assert chunked.chunks[-1].calls == ("scale",)


# --- bad input ---------------------------------------------------------------------------------


def test_syntax_errors_still_chunk_with_a_warning_naming_the_lines():
    source = "def f(:\n    return 1\n\nx = 2\n"
    chunked = chunk_source(source, "broken.py", "python")
    assert_exact(chunked, source)
    [warning] = chunked.warnings
    assert warning.startswith("broken.py: syntax error")
    assert " 1" in warning.split(";")[0] and "rough" in warning


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "model.py"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    with pytest.raises(UserError, match="binary") as error:
        chunk_file(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_non_utf8_file_names_the_line(tmp_path):
    path = tmp_path / "latin1.py"
    path.write_bytes(b"x = 1\ns = 'caf\xe9'\n")
    with pytest.raises(UserError) as error:
        chunk_file(path)
    message = str(error.value)
    assert str(path) in message and "UTF-8" in message and "line 2" in message


@pytest.mark.parametrize("content", [b"", b"  \n\t\n\n"])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "empty.c"
    path.write_bytes(content)
    with pytest.raises(UserError, match="empty") as error:
        chunk_file(path)
    assert str(path) in str(error.value)


def test_unknown_extension_lists_the_supported_ones():
    with pytest.raises(UserError) as error:
        detect_code_language("notes.txt")
    message = str(error.value)
    assert "notes.txt" in message
    for extension in (".py", ".c", ".cpp", ".cu"):
        assert extension in message


def test_detect_code_language_by_extension():
    assert [detect_code_language(p) for p in ("a.py", "b.C", "c.h", "d.hpp", "e.cu")] == [
        "python",
        "c",
        "c",
        "cpp",
        "cuda",
    ]


@pytest.mark.parametrize("name", CODE_LANGUAGES)
def test_each_code_language_is_one_whole_entry(name):
    entry = CODE_LANGUAGES[name]
    assert entry.name == name and entry.label and "return" in entry.keywords
    assert [detect_code_language(f"x{suffix.upper()}") for suffix in entry.suffixes] == [name] * len(entry.suffixes)
    chunked = chunk_source("x;\n", f"x{entry.suffixes[0]}", name)  # its grammar loads and parses
    assert chunked.code_language == name and chunked.chunks[0].code_language == name


def test_a_post_in_a_human_language_is_no_source_file():
    with pytest.raises(UserError, match="unsupported file type .md"):
        detect_code_language("posts/2024-01-02-llama-zh.md")


def test_unknown_symbol_lists_the_available_ones():
    with pytest.raises(UserError) as error:
        chunk_file(GENERATE_FIXTURE, symbol="Llama.sample")
    message = str(error.value)
    assert "Llama.sample" in message
    assert "Llama.generate" in message and "sample_top_p" in message and "Llama.__init__" in message


def test_a_symbol_defined_twice_explains_the_first_with_a_warning():
    source = (
        "class Box:\n"
        "    @property\n"
        "    def size(self):\n"
        "        return self._size\n"
        "\n"
        "    @size.setter\n"
        "    def size(self, value):\n"
        "        self._size = value\n"
    )
    chunked = chunk_source(source, "box.py", "python", symbol="Box.size")
    assert [(c.start_line, c.end_line) for c in chunked.chunks] == [(2, 4)]
    assert chunked.warnings == ["box.py: Box.size is defined 2 times (lines 2, 6); explaining the first"]


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        chunk_file(tmp_path / "nope.py")


# --- properties: any input ------------------------------------------------------------------------

# Garbage made of the characters code is made of, newlines frequent, so that parsers get far.
PYTHONISH = st.text(alphabet="defclass ifor whiletryexcept:()[]{}=+-*#'\"\\\n\n\n\t    xyz123.,@", max_size=400)
CISH = st.text(alphabet="intfor while if else do switch case:(){}[];=+-*/#<>\"'\\\n\n\n\t    xyz123.,", max_size=400)


def check_any_source(source, path, code_language, max_lines):
    if "\x00" in source or not source.strip():
        with pytest.raises(UserError):
            chunk_source(source, path, code_language, max_lines=max_lines)
        return
    chunked = chunk_source(source, path, code_language, max_lines=max_lines)
    assert_exact(chunked, source)
    for symbol in chunked.symbols:
        selected = chunk_source(source, path, code_language, symbol=symbol.name, max_lines=max_lines)
        first = next(s for s in chunked.symbols if s.name == symbol.name)
        assert_exact(selected, first.text, first.start_line)


@PROPERTY
@given(source=st.one_of(st.text(max_size=300), PYTHONISH), max_lines=st.integers(1, 40))
def test_any_python_text_chunks_exactly(source, max_lines):
    check_any_source(source, "gen.py", "python", max_lines)


@PROPERTY
@given(
    source=st.one_of(st.text(max_size=300), CISH),
    max_lines=st.integers(1, 40),
    code_language=st.sampled_from(["c", "cpp", "cuda"]),
)
def test_any_c_text_chunks_exactly(source, max_lines, code_language):
    check_any_source(source, "gen.c", code_language, max_lines)


# --- properties: structured programs ---------------------------------------------------------------


def indent(lines):
    return ["    " + line if line else line for line in lines]


PY_SIMPLE = [
    "x = 1",
    "y = f(x)",
    "return x",
    "pass",
    "# a comment",
    "print('hi')",
    "total += item; count += 1",
    "s = '''multi\n\nline'''",
    "z = (1,\n     2)",
    "",
]
PY_TOP_SIMPLE = ["import os", "from a import b", "CONST = 3", "# banner", ""]


@st.composite
def py_block(draw, depth):
    statements = draw(st.lists(py_statement(depth), min_size=1, max_size=6))
    return ["pass"] + [line for statement in statements for line in statement]


@st.composite
def py_statement(draw, depth):
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(PY_SIMPLE)).split("\n")
    body = indent(draw(py_block(depth + 1)))
    shape = draw(st.sampled_from(["for", "while", "if", "with", "try", "def", "class"]))
    if shape == "if":
        lines = ["if x:"] + body
        for _ in range(draw(st.integers(0, 2))):
            lines += ["elif y:"] + indent(draw(py_block(depth + 1)))
        if draw(st.booleans()):
            lines += ["else:"] + indent(draw(py_block(depth + 1)))
        return lines
    if shape == "try":
        return (
            ["try:"]
            + body
            + ["except ValueError as error:"]
            + indent(draw(py_block(depth + 1)))
            + ["finally:"]
            + indent(draw(py_block(depth + 1)))
        )
    header = {
        "for": "for i in range(3):",
        "while": "while x:",
        "with": "with open(p) as f:",
        "def": "def f(a, b=2):",
        "class": "class C(Base):",
    }[shape]
    decorators = ["@decorator(1)"] if shape in ("def", "class") and draw(st.booleans()) else []
    has_docstring = shape in ("def", "class") and draw(st.booleans())
    docstring = ['    """Doc', "", '    string."""'] if has_docstring else []
    return decorators + [header] + docstring + body


@st.composite
def py_program(draw):
    items = draw(
        st.lists(st.one_of(py_statement(0), st.sampled_from(PY_TOP_SIMPLE).map(lambda s: [s])), min_size=1, max_size=8)
    )
    lines = [line for item in items for line in item] + ["pass"]
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline, newline * 2]))


PY_KIND_OPENERS = {
    "for": ("for", "else"),
    "while": ("while", "else"),
    "with": ("with",),
    "if": ("if", "elif", "else"),
    "try": ("try", "except", "else", "finally"),
    "signature": ("@", "def", "class"),
    "function": ("@", "def"),
    "class": ("@", "class"),
    "return": ("return",),
    "imports": ("import", "from"),
}


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@PROPERTY
@given(source=py_program(), max_lines=st.integers(1, 15))
def test_python_programs_chunk_exactly_at_statement_boundaries(source, max_lines):
    chunked = chunk_source(source, "gen.py", "python", max_lines=max_lines)
    assert chunked.warnings == []
    check_any_source(source, "gen.py", "python", max_lines)
    for chunk in chunked.chunks[1:]:  # the first chunk may open with blank lines of the file
        if chunk.kind in PY_KIND_OPENERS:
            assert first_code_line(chunk.code).startswith(PY_KIND_OPENERS[chunk.kind]), chunk


C_STATEMENTS = [
    "x = 1;",
    "f(x);",
    "return x;",
    "// a comment",
    "/* block\n * comment */",
    "int y = g(1,\n          2);",
    "",
]
C_TOP = [
    "#include <stdio.h>",
    "#define N 3",
    "int counter = 0;",
    "// banner",
    "",
    "typedef struct {\n    int dim;\n\n    float *w;\n} Config;",
]


@st.composite
def c_block(draw, depth):
    statements = draw(st.lists(c_statement(depth), min_size=1, max_size=6))
    return [line for statement in statements for line in statement]


@st.composite
def c_statement(draw, depth):
    if depth >= 3 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(C_STATEMENTS)).split("\n")
    body = indent(draw(c_block(depth + 1)))
    shape = draw(st.sampled_from(["for", "while", "if", "do", "switch"]))
    if shape == "if":
        lines = ["if (x) {"] + body
        if draw(st.booleans()):
            lines += ["} else if (y) {"] + indent(draw(c_block(depth + 1)))
        if draw(st.booleans()):
            lines += ["} else {"] + indent(draw(c_block(depth + 1)))
        return lines + ["}"]
    if shape == "do":
        return ["do {"] + body + ["} while (x);"]
    if shape == "switch":
        return ["switch (x) {", "    case 1:"] + indent(body) + ["    default:", "        break;", "}"]
    header = {"for": "for (int i = 0; i < n; i++) {", "while": "while (x) {"}[shape]
    return [header] + body + ["}"]


@st.composite
def c_program(draw):
    items = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            items += draw(st.sampled_from(C_TOP)).split("\n")
        else:
            comment = ["// what it does"] if draw(st.booleans()) else []
            items += comment + ["int f(int a, float *b) {"] + indent(draw(c_block(1))) + ["}"]
    return "\n".join(items) + draw(st.sampled_from(["", "\n"]))


C_KIND_OPENERS = {
    "for": ("for",),
    "while": ("while",),
    "do": ("do",),
    "switch": ("switch", "case", "default"),
    "if": ("if", "} else", "else"),
    "return": ("return",),
    "imports": ("#include",),
    "class": ("typedef",),
    "function": ("int f(",),
    "signature": ("int f(", "typedef"),
}


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@PROPERTY
@given(source=c_program().filter(str.strip), max_lines=st.integers(1, 15), code_language=st.sampled_from(["c", "cpp"]))
def test_c_programs_chunk_exactly_at_statement_boundaries(source, max_lines, code_language):
    chunked = chunk_source(source, "gen.c", code_language, max_lines=max_lines)
    assert chunked.warnings == []
    check_any_source(source, "gen.c", code_language, max_lines)
    for chunk in chunked.chunks[1:]:
        if chunk.kind in C_KIND_OPENERS:
            assert first_code_line(chunk.code, C_COMMENTS).startswith(C_KIND_OPENERS[chunk.kind]), chunk
