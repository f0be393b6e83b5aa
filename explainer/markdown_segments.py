"""Split a Markdown document into the prose a translator may see and everything it must not touch.

markdown-it-py parses the document. Only the inline content of paragraphs, headings and table
cells becomes prose; everything between those ranges (front matter, fenced and indented code,
HTML and math blocks, Liquid blocks, list and quote markers, table pipes, blank lines) is never
sent anywhere and is copied from the source byte for byte. Inside the prose, inline code, link
targets, URLs, images, inline HTML, math, Liquid tags, escapes and entities are replaced by
numbered placeholders (⟦1⟧, ⟦2⟧, ...) and restored from the source, never from the model.

Positions: markdown-it-py maps block tokens to source lines but gives inline tokens no offsets.
We wrap the inline rules that produce protected tokens so each successful call records the
character range it consumed, then map those ranges from the inline content back to the source.
`locate` hands those ranges out for other uses (render.escape_model_html).

markdown-it-py has inputs it cannot read: 4.3.0 raises IndexError on the 9 bytes ">1. <!--\n>". Every
parse goes through read_markdown, which turns that into UnreadableMarkdown, so a model's answer it
cannot read is an unusable answer (asked again) and an author's post one error line, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import markdown_it
from markdown_it import MarkdownIt
from markdown_it.rules_block import StateBlock
from markdown_it.rules_inline import StateInline
from markdown_it.token import Token
from mdit_py_plugins.dollarmath import dollarmath_plugin
from mdit_py_plugins.front_matter import front_matter_plugin
from mdit_py_plugins.gfm_autolink import gfm_autolink_plugin

from explainer.errors import UserError

PLACEHOLDER_START, PLACEHOLDER_END = "⟦", "⟧"

# Block tokens whose content is copied, never translated; the structure check compares them
# byte for byte and in order.
VERBATIM_BLOCKS = ("fence", "code_block", "math_block", "math_block_label", "html_block", "liquid_block")
# Inline tokens that are restored from the source; compared as a multiset (a translation may
# reorder them within a sentence).
VERBATIM_INLINE = ("code_inline", "math_inline", "math_inline_double", "html_inline", "liquid")

# Env key under which the wrapped inline rules record what they consumed.
_RECORD = "explainer_inline_spans"


def placeholder(number: int) -> str:
    return f"{PLACEHOLDER_START}{number}{PLACEHOLDER_END}"


# ---------------------------------------------------------------------------------------------
# Parser: CommonMark + tables, strikethrough, front matter, $math$, bare URLs, Liquid
# ---------------------------------------------------------------------------------------------

# Jekyll's Liquid block tags whose body must stay exactly as written (highlighted code, raw text).
_LIQUID_BLOCK_TAGS = {"highlight": "endhighlight", "raw": "endraw", "comment": "endcomment"}
# Inline Liquid ({{ output }}, {% tag %}) and kramdown attribute lists ({: .class}).
_INLINE_TAG_CLOSERS = {"{": "}}", "%": "%}", ":": "}"}


def _liquid_tag_names(line: str) -> list[str]:
    """Names of the Liquid tags in a line: '{% highlight python %}' -> ['highlight']."""
    names = []
    start = line.find("{%")
    while start >= 0:
        words = line[start + 2 :].lstrip("-").split()
        if words:
            names.append(words[0].rstrip("-%}"))
        start = line.find("{%", start + 2)
    return names


def _liquid_block_rule(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
    if state.sCount[start_line] - state.blkIndent >= 4:
        return False
    first = state.src[state.bMarks[start_line] + state.tShift[start_line] : state.eMarks[start_line]]
    if not first.startswith("{%"):
        return False
    names = _liquid_tag_names(first)
    closer = _LIQUID_BLOCK_TAGS.get(names[0]) if names else None
    if closer is None:
        return False
    line = start_line
    while closer not in _liquid_tag_names(state.src[state.bMarks[line] : state.eMarks[line]]):
        line += 1
        if line >= end_line:
            return False  # unclosed: leave it to the other rules
    if silent:
        return True
    token = state.push("liquid_block", "", 0)
    token.map = [start_line, line + 1]
    token.content = state.getLines(start_line, line + 1, state.sCount[start_line], True)
    state.line = line + 1
    return True


def _inline_tag_rule(state: StateInline, silent: bool) -> bool:
    src, pos = state.src, state.pos
    if src[pos] != "{" or pos + 1 >= state.posMax or src[pos + 1] not in _INLINE_TAG_CLOSERS:
        return False
    closer = _INLINE_TAG_CLOSERS[src[pos + 1]]
    end = src.find(closer, pos + 2, state.posMax)
    if end < 0:
        return False
    if not silent:
        state.push("liquid", "", 0).content = src[pos : end + len(closer)]
    state.pos = end + len(closer)
    return True


@dataclass
class _Consumed:
    """What one successful inline rule call consumed, in inline-content coordinates."""

    rule: str
    start: int
    end: int
    tokens: list[Token]
    label_end: int = -1  # links only: where the label's closing ']' is


def _recording(rule_name: str, rule):
    """Wrap an inline rule so that, when the env asks for it, each call that makes tokens
    records the range it consumed. Rules that back-scan text already consumed (bare URLs) or
    trim it (a hard break's trailing spaces) shorten the pending text: that length is added to
    the start of the range."""

    def wrapped(state: StateInline, silent: bool) -> bool:
        record = state.env.get(_RECORD)
        if silent or record is None:
            return rule(state, silent)
        start, pending, first_new = state.pos, state.pending, len(state.tokens)
        is_link = rule_name == "link" and state.src[start] == "["
        label_end = state.md.helpers.parseLinkLabel(state, start, True) if is_link else -1
        if not rule(state, silent):
            return False
        new = state.tokens[first_new:]
        # Pushing a token first flushes the pending text as a "text" token; whatever the rule
        # cut from the pending text is missing there.
        kept = 0
        if pending and new and new[0].type == "text":
            kept, new = len(new[0].content), new[1:]
        if new:
            record.append(_Consumed(rule_name, start - (len(pending) - kept), state.pos, new, label_end))
        return True

    return wrapped


class UnreadableMarkdown(UserError):
    """Text markdown-it-py fails on (a bug of the parser, not a mistake of the text's writer)."""


def read_markdown(md: MarkdownIt, text: str, env: dict | None = None) -> list[Token]:
    """md.parse(text, env), with the parser's own failures raised as UnreadableMarkdown."""
    with _parser_failures():
        return md.parse(text, env)


@contextlib.contextmanager
def _parser_failures():
    try:
        yield
    except RecursionError:
        raise UnreadableMarkdown(
            "markdown-it-py cannot read this Markdown (it nests too deeply); flatten its lists or quotes"
        ) from None
    except Exception as exc:  # IndexError and the like, from inside markdown-it-py
        raise UnreadableMarkdown(
            f"markdown-it-py {markdown_it.__version__} cannot read this Markdown "
            f"({type(exc).__name__}: {exc}); reword the text around its HTML, lists "
            "and quotes"
        ) from None


@functools.cache
def parser() -> MarkdownIt:
    """The one Markdown parser used to split documents and to check translations."""
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    md.use(front_matter_plugin)
    md.use(dollarmath_plugin, allow_digits=False, double_inline=True)
    md.use(gfm_autolink_plugin)
    md.block.ruler.before(
        "fence", "liquid_block", _liquid_block_rule, {"alt": ["paragraph", "reference", "blockquote", "list"]}
    )
    md.inline.ruler.before("escape", "liquid", _inline_tag_rule)
    for rule in md.inline.ruler.__rules__:  # Ruler has no public getter for a rule's function
        if rule.name not in ("text", "emphasis", "strikethrough"):  # these make no protected tokens
            md.inline.ruler.at(rule.name, _recording(rule.name, rule.fn))
    return md


def normalize(text: str) -> str:
    """What markdown-it does to its input first; we do it too so that offsets agree."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\0", "\ufffd")


# ---------------------------------------------------------------------------------------------
# Inline content -> prose with placeholders
# ---------------------------------------------------------------------------------------------


@dataclass
class _Span:
    start: int  # inline-content coordinates
    end: int
    kind: str  # "protected", "link_open", "link_close", or "soft" (a soft line break, sent as a space)


def _looks_like_url(text: str) -> bool:
    return not any(ch.isspace() for ch in text) and text.startswith(("http://", "https://", "www."))


def _consumed(content: str, env: dict) -> list[_Consumed]:
    """What each inline rule made of one inline content, with the range it consumed."""
    record: list[_Consumed] = []
    with _parser_failures():
        parser().inline.parse(content, parser(), {**env, _RECORD: record}, [])
    return record


def _spans(content: str, env: dict) -> list[_Span]:
    """Protected ranges and soft breaks of one inline content, outermost only, in order."""
    spans = []
    for consumed in _consumed(content, env):
        types = {token.type for token in consumed.tokens}
        if consumed.rule == "link":
            label = content[consumed.start + 1 : consumed.label_end]
            if _looks_like_url(label):  # [https://x](https://x): the text is a URL too
                spans.append(_Span(consumed.start, consumed.end, "protected"))
            else:  # the label is prose; "[" and "](target)" are not
                spans.append(_Span(consumed.start, consumed.start + 1, "link_open"))
                spans.append(_Span(consumed.label_end, consumed.end, "link_close"))
        elif types == {"softbreak"}:
            spans.append(_Span(consumed.start, consumed.end, "soft"))
        elif types & {"link_open", "image", "hardbreak", "text_special", *VERBATIM_INLINE}:
            spans.append(_Span(consumed.start, consumed.end, "protected"))
    spans.sort(key=lambda span: (span.start, -span.end))
    outermost, reached = [], 0
    for span in spans:
        if span.start >= reached:  # drop what an image's alt text or a code span contains
            outermost.append(span)
            reached = span.end
    return outermost


# ---------------------------------------------------------------------------------------------
# Segments and documents
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One piece of prose: what the model sees, and how to put its answer back."""

    text: str  # prose with placeholders; the only thing ever sent to a model
    protected: tuple[str, ...]  # placeholder n restores protected[n - 1], taken from the source
    protected_content: tuple[str, ...]  # the same, as markdown-it saw it (no quote/list prefixes)
    pairs: tuple[tuple[int, int], ...]  # (open, close) placeholders of a link: order must hold
    content: str  # the inline content as markdown-it saw it: what checks compare against
    start: int  # source range this segment replaces
    end: int
    line: int  # 1-based, for reports
    in_table_cell: bool = False  # a '|' in its translation would split the cell

    @property
    def translatable(self) -> bool:
        """Whether there is any prose at all (not just placeholders, digits and punctuation)."""
        return any(ch.isalpha() for ch in strip_placeholders(self.text))

    def restore(self, translation: str, *, as_content: bool = False) -> str:
        """The translation with every placeholder replaced by the source text it stands for.
        The caller has checked the placeholders (translation_checks.placeholder_problems)."""
        pieces = self.protected_content if as_content else self.protected
        out, pos = [], 0
        while (start := translation.find(PLACEHOLDER_START, pos)) >= 0:
            end = translation.find(PLACEHOLDER_END, start)
            number = int(translation[start + 1 : end])
            out += [translation[pos:start], pieces[number - 1]]
            pos = end + 1
        out.append(translation[pos:])
        return "".join(out)


def placeholder_numbers(text: str) -> list[int] | None:
    """The numbers of the placeholders in `text`, in order; None if one is broken (⟦ without ⟧ and a number)."""
    numbers, pos = [], 0
    while (start := text.find(PLACEHOLDER_START, pos)) >= 0:
        end = text.find(PLACEHOLDER_END, start)
        if end < 0 or not text[start + 1 : end].isdigit():
            return None
        numbers.append(int(text[start + 1 : end]))
        pos = end + 1
    if PLACEHOLDER_END in text[pos:]:
        return None
    return numbers


def strip_placeholders(text: str) -> str:
    out, pos = [], 0
    while (start := text.find(PLACEHOLDER_START, pos)) >= 0:
        end = text.find(PLACEHOLDER_END, start)
        if end < 0:
            break
        out.append(text[pos:start])
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


@dataclass(frozen=True)
class FrontMatter:
    yaml: str  # between the --- lines
    start: int  # source range of the whole block, both --- lines included
    end: int


@dataclass
class Document:
    source: str  # normalized: LF line ends
    front_matter: FrontMatter | None
    segments: list[Segment]
    unmapped_lines: list[int] = field(default_factory=list)  # prose kept as is: could not be located

    def rebuild(self, translations: dict[int, str]) -> str:
        """The source with segment i replaced by translations[i] (placeholders already restored).
        Everything else is copied from the source."""
        out, pos = [], 0
        for index in sorted(translations, key=lambda i: self.segments[i].start):
            out += [self.source[pos : self.segments[index].start], translations[index]]
            pos = self.segments[index].end
        out.append(self.source[pos:])
        return "".join(out)


def _line_offsets(source: str) -> list[int]:
    offsets, pos = [0], 0
    while (pos := source.find("\n", pos) + 1) > 0:
        offsets.append(pos)
    return offsets


def _content_line_starts(
    source: str, line_offsets: list[int], block: Token, inline: Token, cursor: dict[int, int]
) -> list[tuple[int, int]] | None:
    """For each line of the inline content: (number of leading spaces markdown-it added or kept,
    source offset where the rest of the line starts). None when a line cannot be found as it is
    (tabs expanded to spaces, escaped pipes in table cells): that prose is then left untouched."""
    lines = inline.content.split("\n")
    first_line = inline.map[0]
    result = []
    for k, text in enumerate(lines):
        line_no = first_line + k
        line_start = line_offsets[line_no]
        line_end = line_offsets[line_no + 1] - 1 if line_no + 1 < len(line_offsets) else len(source)
        line = source[line_start:line_end]
        stripped = text.lstrip(" \t")
        if block.type == "paragraph_open" or (block.type == "heading_open" and block.markup in ("=", "-")):
            # Paragraph lines are what is left of a source line after its prefix (quote marks,
            # list indentation); only the last loses its trailing spaces.
            tail = line.rstrip() if k == len(lines) - 1 else line
            if not tail.endswith(stripped):
                return None
            at = len(tail) - len(stripped)
        else:  # ATX heading text, or a table cell: search left to right along the line
            at = line.find(stripped, cursor.get(line_no, 0))
            if at < 0:
                return None
            cursor[line_no] = at + len(stripped)
        result.append((len(text) - len(stripped), line_start + at))
    return result


def _atx_text_start(line: str) -> int:
    """Where the text of an ATX heading line starts, so '# # x' does not find the marker."""
    pos = len(line) - len(line.lstrip(" "))
    while pos < len(line) and line[pos] == "#":
        pos += 1
    return pos


def _source_offsets(content: str, line_starts: list[tuple[int, int]]):
    """A function from offsets in an inline content to offsets in the source (see _content_line_starts)."""
    content_line_starts = []
    pos = 0
    for text in content.split("\n"):
        content_line_starts.append(pos)
        pos += len(text) + 1

    def to_source(offset: int) -> int:
        k = max(i for i, start in enumerate(content_line_starts) if start <= offset)
        lead, source_start = line_starts[k]
        return source_start + max(0, offset - content_line_starts[k] - lead)

    return to_source


def _make_segment(source: str, block: Token, inline: Token, line_starts: list[tuple[int, int]], env: dict) -> Segment:
    content = inline.content
    to_source = _source_offsets(content, line_starts)
    text, protected, protected_content, pairs = [], [], [], []
    pos, link_open = 0, 0
    for span in _spans(content, env):
        text.append(content[pos : span.start])
        pos = span.end
        if span.kind == "soft":
            text.append(" ")
            continue
        protected.append(source[to_source(span.start) : to_source(span.end)])
        protected_content.append(content[span.start : span.end])
        text.append(placeholder(len(protected)))
        if span.kind == "link_open":
            link_open = len(protected)
        elif span.kind == "link_close":
            pairs.append((link_open, len(protected)))
    text.append(content[pos:])
    return Segment(
        text="".join(text).strip(),
        protected=tuple(protected),
        protected_content=tuple(protected_content),
        pairs=tuple(pairs),
        content=content,
        start=to_source(0),
        end=to_source(len(content)),
        line=inline.map[0] + 1,
        in_table_cell=block.type in ("th_open", "td_open"),
    )


def _inline_contents(source: str, tokens: list[Token], line_offsets: list[int]):
    """Each inline token that holds text, with the block token it belongs to and where its lines start
    in the source (None where they cannot be found: see _content_line_starts)."""
    cursor: dict[int, int] = {}  # per source line: how far table cells or headings were found
    for index, token in enumerate(tokens):
        if token.type != "inline" or not token.content.strip():
            continue
        block = tokens[index - 1]
        if block.type == "heading_open" and block.markup.startswith("#"):
            line = source[line_offsets[token.map[0]] :]
            cursor[token.map[0]] = _atx_text_start(line.split("\n", 1)[0])
        yield block, token, _content_line_starts(source, line_offsets, block, token, cursor)


def split_document(text: str) -> Document:
    """Parse a Markdown document into its front matter and its prose segments, in order."""
    source = normalize(text)
    env: dict = {}
    tokens = read_markdown(parser(), source, env)
    line_offsets = _line_offsets(source)
    front_matter, segments, unmapped = None, [], []
    for token in tokens:
        if token.type == "front_matter":
            end_line = token.map[1]
            end = line_offsets[end_line] if end_line < len(line_offsets) else len(source)
            front_matter = FrontMatter(token.content, 0, end)
    for block, inline, line_starts in _inline_contents(source, tokens, line_offsets):
        if line_starts is None:
            unmapped.append(inline.map[0] + 1)
            continue
        segments.append(_make_segment(source, block, inline, line_starts, env))
    return Document(source=source, front_matter=front_matter, segments=segments, unmapped_lines=unmapped)


@dataclass(frozen=True)
class Located:
    """A piece of a parsed document and the source range it was made from."""

    kind: str  # a block token's type, or the inline rule that made the piece: "backticks", "autolink", ...
    tokens: tuple[Token, ...]  # the block token, or the tokens the inline rule made
    start: int  # offsets into the normalized source
    end: int


def locate(text: str) -> tuple[str, list[Located]]:
    """The normalized text and where each of its pieces came from: every token that has a line range
    (block tokens, and inline tokens by the lines they span), then what each inline rule made (nested
    pieces, such as a code span in a link's text, come before what holds them). Inline content that
    cannot be located (see Document.unmapped_lines) gives no pieces of its own."""
    source = normalize(text)
    env: dict = {}
    tokens = read_markdown(parser(), source, env)
    line_offsets = _line_offsets(source)

    def offset(line: int) -> int:
        return line_offsets[line] if line < len(line_offsets) else len(source)

    pieces = [
        Located(token.type, (token,), offset(token.map[0]), offset(token.map[1]))
        for token in tokens
        if token.map is not None
    ]
    for _, inline, line_starts in _inline_contents(source, tokens, line_offsets):
        if line_starts is not None:
            to_source = _source_offsets(inline.content, line_starts)
            pieces += [
                Located(consumed.rule, tuple(consumed.tokens), to_source(consumed.start), to_source(consumed.end))
                for consumed in _consumed(inline.content, env)
            ]
    return source, pieces
