"""Split a source file into the pieces a person would paste to an LLM one at a time.

tree-sitter parses the file; this module only decides where to cut. Every cut falls at the start
of a line, and a chunk runs from its cut to the line before the next cut. So the chunks always
add up to the source byte for byte with their original line numbers, whatever the parser made of
the file: blank lines after a piece end the chunk before them.

Where the cuts go:
- Without a symbol, the file's top-level items in order: a run of imports is one chunk; every
  definition gets its own chunks; other top-level code is grouped at blank lines.
- A definition that fits in `max_lines` is one chunk. A longer one opens with its signature
  (decorators, signature, docstring); a function's body follows in groups of statements split at
  blank lines, and a class's members follow, each method split the same way.
- Compound statements (for, while, if, with, try, match; C: for, while, do, if, switch) get chunks
  of their own. One longer than `max_lines` is split again: its header with the statements that
  open its body, then the rest of its body as above, and a chunk per else/elif/except/case clause.
- Comments go with the code that follows them (C: the comment above a function is its docstring).

Chunk kinds, `Chunk.kind`:
  "imports"    a run of import statements or #include lines
  "module"     other top-level code
  "function"   a whole function or method that fits in max_lines
  "class"      a whole class (C/C++: struct, union, class) that fits in max_lines
  "signature"  the opening of a longer definition: decorators/template, signature, docstring
  "block"      plain statements inside a definition or a compound statement
  "return"     a return statement on its own
  "for", "while", "do", "if", "switch", "match", "with", "try"
               a compound statement, or one piece of a long one
"""

from __future__ import annotations

import bisect
import builtins
import importlib
import keyword
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

import tree_sitter

from explainer.errors import UserError

CHUNK_KINDS = (
    "imports",
    "module",
    "function",
    "class",
    "signature",
    "block",
    "return",
    "for",
    "while",
    "do",
    "if",
    "switch",
    "match",
    "with",
    "try",
)


@dataclass(frozen=True)
class Symbol:
    """A top-level function or class, or a method (a function defined in a class)."""

    name: str  # qualified: "Llama.generate" (C++: "Llama::generate"), "sample_top_p"
    kind: str  # "function" | "method" | "class"
    start_line: int  # 1-based, inclusive; decorators and C++ templates included
    end_line: int
    signature: str  # decorators + signature line(s), exact source text
    docstring: str  # exact source text of the docstring literal; C: of the comment above; "" if none
    text: str  # the definition's whole lines, exactly as in the source


@dataclass(frozen=True)
class Chunk:
    path: str
    code_language: str  # "python" | "c" | "cpp" | "cuda"
    symbol: str  # qualified name of the enclosing symbol, "" for module-level code
    kind: str  # one of CHUNK_KINDS
    start_line: int  # 1-based, inclusive, original line numbers
    end_line: int
    code: str  # exact source text of those lines
    calls: tuple[str, ...]  # same-file symbols this chunk calls, in order of first call


@dataclass
class ChunkedFile:
    path: str
    code_language: str
    source: str
    symbols: list[Symbol]  # every definition, methods included, in source order
    chunks: list[Chunk]
    warnings: list[str]


# --- programming languages ------------------------------------------------------------------


@dataclass(frozen=True)
class _Grammar:
    """How the chunker reads one tree-sitter grammar's syntax trees."""

    package: str  # the tree-sitter grammar package
    separator: str  # between a class and its members in qualified names
    compound: dict[str, str]  # compound statement node type -> chunk kind
    bodies: frozenset[str]  # node types whose named children are statements or members
    clauses: frozenset[str]  # else/elif/except/catch: a chunk each when a statement is split
    containers: frozenset[str]  # #if, namespace, extern "C": their items count as their siblings
    imports: frozenset[str]
    call: str  # the call node type
    members_callable_by_name: bool  # C++: inside a method, `f()` may call the method Class::f


_PYTHON = _Grammar(
    package="tree_sitter_python",
    separator=".",
    compound={
        "for_statement": "for",
        "while_statement": "while",
        "if_statement": "if",
        "with_statement": "with",
        "try_statement": "try",
        "match_statement": "match",
        "case_clause": "match",
    },
    bodies=frozenset({"block"}),
    clauses=frozenset({"elif_clause", "else_clause", "except_clause", "except_group_clause", "finally_clause"}),
    containers=frozenset(),
    imports=frozenset({"import_statement", "import_from_statement", "future_import_statement"}),
    call="call",
    members_callable_by_name=False,
)
_C = _Grammar(
    package="tree_sitter_c",
    separator="::",
    compound={
        "for_statement": "for",
        "while_statement": "while",
        "do_statement": "do",
        "if_statement": "if",
        "switch_statement": "switch",
        "case_statement": "switch",
        "compound_statement": "block",
    },
    bodies=frozenset({"compound_statement", "field_declaration_list", "declaration_list"}),
    clauses=frozenset({"else_clause"}),
    containers=frozenset({"preproc_if", "preproc_ifdef", "preproc_else", "preproc_elif", "preproc_elifdef"}),
    imports=frozenset({"preproc_include"}),
    call="call_expression",
    members_callable_by_name=False,
)
_CPP = replace(
    _C,
    package="tree_sitter_cpp",
    compound={**_C.compound, "for_range_loop": "for", "try_statement": "try"},
    clauses=_C.clauses | {"catch_clause"},
    containers=_C.containers | {"namespace_definition", "linkage_specification"},
    members_callable_by_name=True,
)

# Words an explanation may put in backticks that are not names from the file, so not names a
# model could have invented. Python's come from the keyword and builtins modules.
_PYTHON_KEYWORDS = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))
_C_FAMILY_KEYWORDS = frozenset(
    "auto break case char const constexpr continue default do double else enum extern false float for "
    "goto if inline int long nullptr NULL register return short signed sizeof static struct switch "
    "template this true typedef union unsigned void volatile while class public private protected "
    "virtual namespace new delete bool __global__ __device__ __host__ __shared__".split()
)


@dataclass(frozen=True)
class CodeLanguage:
    """A programming language the chunker reads: its files, its name in prompts, its keywords, its grammar."""

    name: str  # Chunk.code_language, Post.code_language and the info string of its code fences
    label: str  # how prompts name it: "C++"
    suffixes: tuple[str, ...]  # file name endings, lower case
    keywords: frozenset[str]  # keywords and builtins: backticked words that no file needs to define
    grammar: _Grammar


CODE_LANGUAGES = {
    entry.name: entry
    for entry in (
        CodeLanguage("python", "Python", (".py", ".pyi"), _PYTHON_KEYWORDS, _PYTHON),
        CodeLanguage("c", "C", (".c", ".h"), _C_FAMILY_KEYWORDS, _C),
        CodeLanguage(
            "cpp", "C++", (".cc", ".cpp", ".cxx", ".c++", ".hh", ".hpp", ".hxx", ".h++"), _C_FAMILY_KEYWORDS, _CPP
        ),
        CodeLanguage("cuda", "CUDA", (".cu", ".cuh"), _C_FAMILY_KEYWORDS, replace(_CPP, package="tree_sitter_cuda")),
    )
}
_BY_SUFFIX = {suffix: entry.name for entry in CODE_LANGUAGES.values() for suffix in entry.suffixes}

_CLASS_SPECIFIERS = ("struct_specifier", "class_specifier", "union_specifier")
# Deeper nesting is kept whole rather than split further: real code stays far below this
# (Python allows 100 indentation levels), and recursing deeper would hit Python's stack limit.
_MAX_NESTING = 100


def _supported_extensions() -> str:
    return ", ".join(sorted(_BY_SUFFIX))


def detect_code_language(path) -> str:
    """The programming language of a source file, by its name: a key of CODE_LANGUAGES."""
    suffix = Path(path).suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise UserError(
            f"{path}: unsupported file type {suffix or '(no extension)'}; "
            f"pass a source file ending in one of {_supported_extensions()}"
        )
    return _BY_SUFFIX[suffix]


@cache
def _parser(code_language: str) -> tree_sitter.Parser:
    grammar = importlib.import_module(CODE_LANGUAGES[code_language].grammar.package)
    return tree_sitter.Parser(tree_sitter.Language(grammar.language()))


# --- entry points --------------------------------------------------------------------------


def comments_in(chunked: ChunkedFile, first: int, last: int) -> list[str]:
    """The text of the comments on lines first..last (1-based) of the file, as the grammar finds them."""
    return [node.text.decode("utf-8", "replace") for node in _nodes_in(chunked, first, last, ("comment",))]


def identifiers_in(chunked: ChunkedFile, first: int, last: int) -> list[str]:
    """The names the code on lines first..last uses (identifiers and fields), each once, in order."""
    names: dict[str, None] = {}
    for node in _nodes_in(chunked, first, last, IDENTIFIER_NODES):
        names.setdefault(node.text.decode("utf-8", "replace"))
    return list(names)


IDENTIFIER_NODES = ("identifier", "field_identifier", "type_identifier")


@lru_cache(maxsize=4)
def _tree(code_language: str, source: str) -> tree_sitter.Tree:
    """The file's syntax tree, parsed once for all the pieces whose names and comments are asked for."""
    return _parser(code_language).parse(source.encode("utf-8"))


def _nodes_in(chunked: ChunkedFile, first: int, last: int, types: tuple[str, ...]) -> list[tree_sitter.Node]:
    tree = _tree(chunked.code_language, chunked.source)
    found: list[tree_sitter.Node] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.end_point[0] + 1 < first or node.start_point[0] + 1 > last:
            continue
        if node.type in types:
            if first <= node.start_point[0] + 1 <= last:
                found.append(node)
        else:
            stack.extend(reversed(node.children))
    return found


def chunk_file(path, symbol: str | None = None, max_lines: int = 30, display_path: str | None = None) -> ChunkedFile:
    """Read a source file and split it; see chunk_source. Chunks and messages name the file as
    display_path (default: path as given), so a caller can keep where the checkout lives out of them."""
    code_language = detect_code_language(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; pass a source file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    if b"\x00" in data:
        raise UserError(_binary_message(path))
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}: not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}); "
            "save the file as UTF-8 and try again"
        ) from None
    return chunk_source(source, display_path or str(path), code_language, symbol=symbol, max_lines=max_lines)


def chunk_source(
    source: str, path: str, code_language: str, symbol: str | None = None, max_lines: int = 30
) -> ChunkedFile:
    """Split source code into chunks: all of it in order, or only the definition named `symbol`."""
    if code_language not in CODE_LANGUAGES:
        raise UserError(
            f"{path}: unsupported programming language {code_language!r}; supported: {', '.join(CODE_LANGUAGES)}"
        )
    if "\x00" in source:
        raise UserError(_binary_message(path))
    if not source.strip():
        raise UserError(f"{path}: the file is empty or only whitespace; pass a file with code in it")
    if max_lines < 1:
        raise UserError(f"max_lines must be at least 1, not {max_lines}")
    return _FileChunker(source, path, code_language, max_lines).run(symbol)


def enclosing_view(chunked: ChunkedFile, chunk: Chunk) -> str:
    """The enclosing symbol's lines numbered as in the file, the chunk's lines marked with '>>'.

    Module-level chunks have no enclosing symbol; their view is the chunk alone."""
    owner = next(
        (
            s
            for s in chunked.symbols
            if s.name == chunk.symbol and s.start_line <= chunk.end_line and chunk.start_line <= s.end_line
        ),
        None,
    )
    first, last = chunk.start_line, chunk.end_line
    if owner is not None:
        first, last = min(first, owner.start_line), max(last, owner.end_line)
    return numbered_lines(chunked, first, last, marked=(chunk.start_line, chunk.end_line))


def numbered_lines(chunked: ChunkedFile, first: int, last: int, marked: tuple[int, int] | None = None) -> str:
    """Lines first..last numbered as in the file; with `marked` (first, last), those lines get '>>'
    in a marker column."""
    lines = chunked.source.split("\n")
    width = len(str(last))
    view = []
    for number in range(first, last + 1):
        marker = ""
        if marked is not None:
            marker = ">> " if marked[0] <= number <= marked[1] else "   "
        view.append(f"{marker}{number:>{width}} | {lines[number - 1].rstrip(chr(13))}")
    return "\n".join(view)


def _binary_message(path) -> str:
    return (
        f"{path}: looks like a binary file (it contains NUL bytes); "
        f"pass a source file ending in one of {_supported_extensions()}"
    )


# --- the chunker ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Definition:
    name: str  # qualified
    kind: str  # "function" | "method" | "class"
    node: tree_sitter.Node  # the whole definition: decorators, template, typedef included
    body: tree_sitter.Node | None  # holds its statements or members
    docstring: tree_sitter.Node | None  # Python: the docstring statement


@dataclass(frozen=True)
class _Note:
    """A line that goes with the code below it: a comment, or the `#ifdef`/`namespace` line that
    opens a container."""

    first_row: int
    last_row: int


@dataclass
class _Unit:
    """One item of a body: a statement or definition with the comments above it."""

    first_row: int  # 0-based, leading comments included
    last_row: int
    node: tree_sitter.Node
    definition: _Definition | None


@dataclass(frozen=True)
class _Cut:
    row: int  # 0-based: a chunk starts at the beginning of this line
    kind: str
    symbol: str


def _rows(node: tree_sitter.Node) -> tuple[int, int]:
    """First and last line a node occupies (a node ending at column 0 ends on the line before)."""
    start, end = node.start_point, node.end_point
    last = end.row - 1 if end.column == 0 and end.row > start.row else end.row
    return start.row, last


def _declarator_name(node: tree_sitter.Node) -> str:
    """The declared name inside C declarators like `*const name(args)` or `&Class::name()`."""
    declarator = node.child_by_field_name("declarator")
    while declarator is not None:
        inner = declarator.child_by_field_name("declarator") or next(
            (c for c in declarator.named_children if c.type.endswith("declarator")), None
        )
        if inner is None:
            break
        declarator = inner
    if declarator is None:
        return ""
    return "".join(declarator.text.decode("utf-8", "replace").split())


class _FileChunker:
    def __init__(self, source: str, path: str, code_language: str, max_lines: int):
        self.source, self.path, self.code_language, self.max_lines = source, path, code_language, max_lines
        self.grammar = CODE_LANGUAGES[code_language].grammar
        parts = source.split("\n")  # tree-sitter counts rows by "\n" only; so must we
        self.lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        self.blank = [not line.strip() for line in self.lines]
        data = source.encode("utf-8")
        # A UTF-8 byte order mark is not code; parse without it. Rows stay the same.
        self.code = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        self.row_starts = [0]
        newline = self.code.find(b"\n")
        while newline != -1:
            self.row_starts.append(newline + 1)
            newline = self.code.find(b"\n", newline + 1)
        self.tree = _parser(code_language).parse(self.code)
        self.nesting = 0  # how many splits deep the chunker is

    # ---- the whole job

    def run(self, symbol: str | None) -> ChunkedFile:
        root = self.tree.root_node
        definitions = self._collect(root.named_children, owner="")
        symbols = [self._symbol(d) for d in definitions]
        warnings = []
        if symbol is None:
            first, last = 0, len(self.lines) - 1
            cuts = self._item_cuts(root.named_children, scope="", owner="", simple_kind="module")
        else:
            matches = [d for d in definitions if d.name == symbol]
            if not matches:
                raise UserError(self._unknown_symbol_message(symbol, symbols))
            if len(matches) > 1:
                where = ", ".join(str(_rows(d.node)[0] + 1) for d in matches)
                warnings.append(
                    f"{self.path}: {symbol} is defined {len(matches)} times (lines {where}); explaining the first"
                )
            chosen = matches[0]
            first, last = _rows(chosen.node)
            cuts = self._unit_cuts(_Unit(first, last, chosen.node, chosen), scope=symbol, owner="")
        chunks = self._assemble(cuts, first, last)
        chunks = self._with_calls(chunks, symbols)
        syntax = self._syntax_warning(first, last)
        return ChunkedFile(
            self.path, self.code_language, self.source, symbols, chunks, ([syntax] if syntax else []) + warnings
        )

    def _unknown_symbol_message(self, symbol: str, symbols: list[Symbol]) -> str:
        if not symbols:
            return (
                f"{self.path}: no symbol named {symbol!r}: the file defines no functions or "
                "classes; leave out the symbol to explain the whole file"
            )
        names = ", ".join(dict.fromkeys(s.name for s in symbols))
        return f"{self.path}: no symbol named {symbol!r}; available symbols: {names}"

    # ---- definitions

    def _definition(self, node: tree_sitter.Node, owner: str) -> _Definition | None:
        """The function or class `node` defines, named inside class `owner` ("" at top level)."""
        if self.code_language == "python":
            return self._python_definition(node, owner)
        return self._c_definition(node, owner)

    def _qualified(self, owner: str, name: str) -> str:
        return f"{owner}{self.grammar.separator}{name}" if owner else name

    def _python_definition(self, node, owner):
        inner = node.child_by_field_name("definition") if node.type == "decorated_definition" else node
        if inner is None or inner.type not in ("function_definition", "class_definition"):
            return None
        name, body = inner.child_by_field_name("name"), inner.child_by_field_name("body")
        if name is None:
            return None
        if inner.type == "class_definition":
            kind = "class"
        else:
            kind = "method" if owner else "function"
        return _Definition(self._qualified(owner, name.text.decode()), kind, node, body, self._python_docstring(body))

    @staticmethod
    def _python_docstring(body):
        first = next((c for c in body.named_children if c.type != "comment"), None) if body else None
        if (
            first is not None
            and first.type == "expression_statement"
            and first.named_child_count == 1
            and first.named_children[0].type in ("string", "concatenated_string")
        ):
            return first
        return None

    def _c_definition(self, node, owner):
        if node.type == "template_declaration":
            for child in node.named_children:
                found = self._c_definition(child, owner)
                if found is not None:
                    return replace(found, node=node)
            return None
        if node.type == "function_definition":
            name = _declarator_name(node)
            if not name:
                return None
            kind = "method" if owner or "::" in name else "function"
            return _Definition(self._qualified(owner, name), kind, node, node.child_by_field_name("body"), None)
        specifier = node
        if node.type in ("declaration", "type_definition", "field_declaration"):
            specifier = node.child_by_field_name("type")
        if specifier is None or specifier.type not in _CLASS_SPECIFIERS:
            return None
        body = specifier.child_by_field_name("body")
        name_node = specifier.child_by_field_name("name")
        name = (
            name_node.text.decode("utf-8", "replace")
            if name_node is not None
            else _declarator_name(node)
            if node is not specifier
            else ""
        )
        if body is None or not name:
            return None
        return _Definition(self._qualified(owner, "".join(name.split())), "class", node, body, None)

    def _members(self, definition: _Definition) -> list[tree_sitter.Node]:
        """The statements or members of a definition, after its docstring."""
        if definition.body is None or definition.body.type not in self.grammar.bodies:
            return []
        members = definition.body.named_children
        if definition.docstring is not None:
            members = [m for m in members if m.start_byte >= definition.docstring.end_byte]
        return members

    def _collect(self, nodes, owner: str) -> list[_Definition]:
        found = []
        for piece in self._flatten(nodes):
            definition = None if isinstance(piece, _Note) else self._definition(piece, owner)
            if definition is not None:
                found.append(definition)
                if definition.kind == "class":
                    found += self._collect(self._members(definition), definition.name)
        return found

    def _symbol(self, definition: _Definition) -> Symbol:
        first, last = _rows(definition.node)
        start = self.row_starts[first]
        body = definition.body
        header_end = body.start_byte if body is not None else definition.node.end_byte
        signature = self.code[start:header_end].decode("utf-8", "replace").rstrip()
        if definition.docstring is not None:
            docstring = definition.docstring.text.decode("utf-8", "replace")
        else:
            docstring = self._comment_above(definition.node)
        return Symbol(
            definition.name,
            definition.kind,
            first + 1,
            last + 1,
            signature,
            docstring,
            "".join(self.lines[first : last + 1]),
        )

    def _comment_above(self, node) -> str:
        if self.code_language == "python":
            return ""
        comments = []
        above = node.prev_sibling
        top = node.start_point.row
        while (
            above is not None
            and above.type == "comment"
            and above.end_point.row >= top - 1
            and not self._follows_code(above)
        ):
            comments.insert(0, above)
            top = above.start_point.row
            above = above.prev_sibling
        if not comments:
            return ""
        return self.code[comments[0].start_byte : comments[-1].end_byte].decode("utf-8", "replace")

    # ---- items: the statements of a body, or a file's top-level code

    def _flatten(self, nodes, depth: int = 0):
        """Items in order, with containers (#if, namespace, syntax-error nodes) opened up so
        that what they hold is chunked like their siblings."""
        for node in nodes:
            if (node.type not in self.grammar.containers and not node.is_error) or depth > _MAX_NESTING:
                yield node
                continue
            yield _Note(node.start_point.row, node.start_point.row)
            for index, child in enumerate(node.children):
                if node.field_name_for_child(index) in ("name", "condition", "value"):
                    continue
                if child.type in self.grammar.bodies and not child.type == "compound_statement":
                    yield from self._flatten(child.named_children, depth + 1)
                elif child.is_named or node.is_error:
                    yield from self._flatten([child], depth + 1)

    def _blank_between(self, above: int, below: int) -> bool:
        return any(self.blank[row] for row in range(above + 1, min(below, len(self.blank))))

    def _units(self, nodes, owner: str | None) -> list[_Unit]:
        """Items with the comments above them; `owner` names the class whose members they are
        ("" at top level), None where definitions are not symbols (inside functions)."""
        units: list[_Unit] = []
        notes: list[_Note] = []
        for piece in self._flatten(nodes):
            is_note = isinstance(piece, _Note) or piece.type == "comment"
            first, last = (piece.first_row, piece.last_row) if isinstance(piece, _Note) else _rows(piece)
            if units and (first <= units[-1].last_row or self._follows_code(piece)):
                # It shares a line with the code before, so no cut can separate them.
                units[-1].last_row = max(units[-1].last_row, last)
                continue
            if is_note:
                notes.append(_Note(first, last))
                continue
            if units and notes:
                notes = self._keep_trailing_comments(units[-1], notes, first)
            first_row = notes[0].first_row if notes else first
            notes = []
            definition = self._definition(piece, owner or "")
            units.append(_Unit(first_row, last, piece, definition))
        return units

    def _follows_code(self, piece) -> bool:
        """Whether code comes before this node on its first line (like `}  // end`)."""
        if isinstance(piece, _Note):
            return False
        return bool(self.code[self.row_starts[piece.start_point.row] : piece.start_byte].strip())

    def _keep_trailing_comments(self, previous: _Unit, notes: list[_Note], next_row: int) -> list[_Note]:
        """Comments right under an item and followed by a blank line end that item; the rest
        open the next one. Returns the comments for the next item."""
        if self._blank_between(previous.last_row, notes[0].first_row):
            return notes
        end = 1
        while end < len(notes) and not self._blank_between(notes[end - 1].last_row, notes[end].first_row):
            end += 1
        following = notes[end].first_row if end < len(notes) else next_row
        if not self._blank_between(notes[end - 1].last_row, following):
            return notes
        previous.last_row = notes[end - 1].last_row
        return notes[end:]

    def _is_simple(self, unit: _Unit) -> bool:
        return unit.definition is None and unit.node.type not in self.grammar.compound

    def _is_import(self, unit: _Unit) -> bool:
        return unit.node.type in self.grammar.imports

    def _item_cuts(
        self, nodes, scope: str, owner: str | None, simple_kind: str = "block", header_takes_first_run: bool = False
    ) -> list[_Cut]:
        """Cuts for a list of items: runs of plain statements split at blank lines, every
        definition and compound statement on its own. With `header_takes_first_run`, the first
        run stays with the header above it (a long `for` keeps its first statements)."""
        units = self._units(nodes, owner)
        cuts: list[_Cut] = []
        run: list[_Unit] = []
        for unit in units:
            if self._is_simple(unit):
                if run and self._ends_run(run[-1], unit):
                    cuts += self._run_cuts(run, scope, simple_kind)
                    run = []
                run.append(unit)
            else:
                cuts += self._run_cuts(run, scope, simple_kind)
                run = []
                cuts += self._unit_cuts(unit, scope, owner)
        cuts += self._run_cuts(run, scope, simple_kind)
        if header_takes_first_run and units and self._is_simple(units[0]):
            cuts = cuts[1:]
        return cuts

    def _ends_run(self, previous: _Unit, unit: _Unit) -> bool:
        both_imports = self._is_import(previous) and self._is_import(unit)
        if both_imports:
            return False  # imports stay together across blank lines
        return self._is_import(previous) != self._is_import(unit) or self._blank_between(
            previous.last_row, unit.first_row
        )

    def _run_cuts(self, run: list[_Unit], scope: str, simple_kind: str) -> list[_Cut]:
        """A run of plain statements, cut between statements where it outgrows max_lines."""
        pieces: list[list[_Unit]] = []
        for unit in run:
            if pieces and unit.last_row - pieces[-1][0].first_row < self.max_lines:
                pieces[-1].append(unit)
            else:
                pieces.append([unit])
        cuts = []
        for piece in pieces:
            if all(self._is_import(unit) for unit in piece):
                kind = "imports"
            elif len(piece) == 1 and piece[0].node.type == "return_statement":
                kind = "return"
            else:
                kind = simple_kind
            cuts.append(_Cut(piece[0].first_row, kind, scope))
        return cuts

    def _fits(self, first_row: int, last_row: int) -> bool:
        return last_row - first_row < self.max_lines or self.nesting >= _MAX_NESTING

    @contextmanager
    def _deeper(self):
        self.nesting += 1
        try:
            yield
        finally:
            self.nesting -= 1

    def _unit_cuts(self, unit: _Unit, scope: str, owner: str | None) -> list[_Cut]:
        """Cuts for a definition or compound statement: one if it fits, else split."""
        definition = unit.definition
        if definition is None:
            kind = self.grammar.compound[unit.node.type]
            if self._fits(unit.first_row, unit.last_row):
                return [_Cut(unit.first_row, kind, scope)]
            return self._compound_cuts(unit.node, kind, scope, unit.first_row)
        is_symbol = owner is not None
        name = definition.name if is_symbol else scope
        whole = "class" if definition.kind == "class" else "function"
        if self._fits(unit.first_row, unit.last_row):
            return [_Cut(unit.first_row, whole, name)]
        member_owner = definition.name if is_symbol and definition.kind == "class" else None
        with self._deeper():
            members = self._item_cuts(self._members(definition), name, member_owner)
        return [_Cut(unit.first_row, "signature", name)] + self._below_header(definition.body, members)

    def _below_header(self, body, cuts: list[_Cut]) -> list[_Cut]:
        """Drop cuts that would split a header from its body (code on the `{` or `:` line)."""
        if body is None:
            return cuts
        opening = body.children[0] if body.children and not body.children[0].is_named else None
        header_row = (
            opening.start_point.row
            if opening is not None
            else (body.prev_sibling.end_point.row if body.prev_sibling is not None else body.start_point.row)
        )
        return [cut for cut in cuts if cut.row > header_row]

    def _compound_cuts(self, node, kind: str, scope: str, first_row: int) -> list[_Cut]:
        """A long compound statement: header with its first statements, then the rest."""
        with self._deeper():
            return [_Cut(first_row, kind, scope)] + self._compound_body_cuts(node, kind, scope)

    def _compound_body_cuts(self, node, kind: str, scope: str) -> list[_Cut]:
        cuts = []
        if node.type in self.grammar.bodies:  # a bare { ... } block
            return self._below_header(
                node, self._item_cuts(node.named_children, scope, None, header_takes_first_run=True)
            )
        if node.type == "case_statement":  # C: statements follow `case X:` directly
            colon = next((c for c in node.children if c.type == ":"), None)
            statements = [c for c in node.named_children if colon is not None and c.start_byte >= colon.end_byte]
            return self._item_cuts(statements, scope, None, header_takes_first_run=True)
        for child in node.children:
            child_first, child_last = _rows(child)
            if child.type in self.grammar.bodies:
                cuts += self._below_header(
                    child, self._item_cuts(child.named_children, scope, None, header_takes_first_run=True)
                )
            elif child.type in self.grammar.clauses:
                if self._fits(child_first, child_last):
                    cuts.append(_Cut(child_first, kind, scope))
                else:
                    cuts += self._compound_cuts(child, kind, scope, child_first)
            elif child.type in self.grammar.compound and not self._fits(child_first, child_last):
                # C: a statement without braces, like the `if` of `else if`
                cuts += self._compound_cuts(child, self.grammar.compound[child.type], scope, child_first)
        return cuts
        return cuts

    # ---- chunks

    def _assemble(self, cuts: list[_Cut], first: int, last: int) -> list[Chunk]:
        kept: list[_Cut] = []
        for cut in sorted((c for c in cuts if first <= c.row <= last), key=lambda c: c.row):
            if not kept or cut.row > kept[-1].row:
                kept.append(cut)
        if not kept:  # nothing but comments
            kept = [_Cut(first, "module", "")]
        kept[0] = replace(kept[0], row=first)  # leading blank lines go with the first chunk
        chunks = []
        for cut, after in zip(kept, kept[1:] + [None]):
            end = after.row - 1 if after is not None else last
            chunks.append(
                Chunk(
                    self.path,
                    self.code_language,
                    cut.symbol,
                    cut.kind,
                    cut.row + 1,
                    end + 1,
                    "".join(self.lines[cut.row : end + 1]),
                    (),
                )
            )
        return chunks

    def _with_calls(self, chunks: list[Chunk], symbols: list[Symbol]) -> list[Chunk]:
        """Each chunk with the same-file symbols it calls."""
        kinds = {s.name: s.kind for s in symbols}
        separator = self.grammar.separator
        starts = [chunk.start_line for chunk in chunks]
        calls: list[list[str]] = [[] for _ in chunks]
        for call in self._nodes_of_type(self.grammar.call):
            line = call.start_point.row + 1
            index = bisect.bisect_right(starts, line) - 1
            if index < 0 or line > chunks[index].end_line:
                continue
            owner = chunks[index].symbol
            if kinds.get(owner) == "method":
                owner = owner.rpartition(separator)[0]
            elif kinds.get(owner) != "class":
                owner = ""
            for name in self._callees(call, owner):
                if name in kinds:
                    if name not in calls[index]:
                        calls[index].append(name)
                    break
        return [replace(chunk, calls=tuple(names)) for chunk, names in zip(chunks, calls)]

    def _callees(self, call, owner: str) -> list[str]:
        """Names the called function may have among this file's symbols, likeliest first."""
        function = call.child_by_field_name("function")
        if function is not None and function.type == "template_function":
            function = function.child_by_field_name("name")
        if function is None:
            return []
        text = "".join(function.text.decode("utf-8", "replace").split())
        if function.type == "identifier":
            if owner and self.grammar.members_callable_by_name:
                return [self._qualified(owner, text), text]
            return [text]
        if function.type == "qualified_identifier":
            return [text]
        if function.type == "attribute":  # Python: self.method(...), Class.method(...)
            target = function.child_by_field_name("object")
            attribute = function.child_by_field_name("attribute")
            if target is None or target.type != "identifier" or attribute is None:
                return []
            receiver = target.text.decode()
            if receiver in ("self", "cls"):
                receiver = owner
            return [self._qualified(receiver, attribute.text.decode())] if receiver else []
        if function.type == "field_expression":  # C++: this->method(...)
            target = function.child_by_field_name("argument")
            field = function.child_by_field_name("field")
            if owner and target is not None and target.type == "this" and field is not None:
                return [self._qualified(owner, field.text.decode())]
        return []

    def _nodes_of_type(self, node_type: str):
        stack = [self.tree.root_node]
        while stack:
            node = stack.pop()
            if node.type == node_type:
                yield node
            stack.extend(reversed(node.children))

    def _syntax_warning(self, first: int, last: int) -> str:
        root = self.tree.root_node
        if not root.has_error:
            return ""
        rows = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if node.is_error or node.is_missing:
                rows.add(node.start_point.row)
            stack.extend(c for c in node.children if c.has_error or c.is_missing)
        lines = [row + 1 for row in sorted(rows) if first <= row <= last]
        if not lines:
            return ""
        shown = ", ".join(map(str, lines[:10])) + (f" and {len(lines) - 10} more" if len(lines) > 10 else "")
        noun = "syntax error at line" if len(lines) == 1 else "syntax errors at lines"
        return f"{self.path}: {noun} {shown}; chunks around them may be rough"
