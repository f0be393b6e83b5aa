"""Model-written Markdown made safe to publish through kramdown, Jekyll's Markdown converter.

kramdown passes raw HTML through, so an explained file that holds a prompt injection could put a
`<script>` into a post. escape_model_html escapes the raw HTML in what a model wrote and leaves its
Markdown formatting alone. markdown-it-py (markdown_segments.locate) says where things are, but
kramdown reads the text by rules of its own, and only what kramdown reads matters on the site: so
whatever kramdown could read otherwise than markdown-it does is made inert too. Each such rule
below answers a case found by running kramdown itself over generated text.

Names are not Markdown at all: a file name or a model name that reaches a caption or a notice is
shown as written by plain_text, whatever it holds (`x<img src=x onerror=...>.py`).
"""

from __future__ import annotations

import html
import unicodedata

from explainer.markdown_segments import Located, locate

# URL schemes that run code or carry a page of their own; written as a link's target, kramdown makes them live.
SCRIPT_SCHEMES = ("javascript", "vbscript", "data")
# Autolinks (<https://...>) that kramdown also makes; any other <...> is text.
SAFE_AUTOLINKS = ("http://", "https://", "mailto:")
# What may sit among the letters of a live scheme: browsers drop tabs and newlines from a URL, and
# kramdown keeps a link target's line breaks and drops the quote markers and indentation between them.
SCHEME_GAPS = frozenset(" \t\r\n>")
_LONGEST_SCHEME = max(map(len, SCRIPT_SCHEMES))
_TEXT, _LITERAL, _HTML, _REWRITTEN = 0, 1, 2, 3  # how each character of the source is escaped


# Punctuation that starts Markdown anywhere in a line (emphasis, code, links, images, kramdown's {: and $$
# math, GFM tables), escaped with a backslash: kramdown and CommonMark both take these escapes.
_INLINE_SYNTAX = frozenset("\\`*[]{}!|$")
# Punctuation that starts a block only at the start of a line: headings, lists, setext underlines, and
# kramdown's definitions (": text", even after a blank line) and end-of-block marker (a lone "^").
_BLOCK_STARTS = frozenset("#+-=:^")
# kramdown does not take \~ or \& (the backslash would show), so these are character references.
_REFERENCES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "~": "&#126;"}


def plain_text(text: str) -> str:
    """`text` (a file name, a model name: anything that is not Markdown) as Markdown, on one line, that
    kramdown and CommonMark both show as written, with no HTML, link or formatting of its own.

    A line break or other control character shows as a space: a name must not start a block. An
    underscore inside a word stays as it is (neither reads it as emphasis), so `llama_ref/model.py`
    reads the same in the page's source."""
    text = "".join(" " if unicodedata.category(char) == "Cc" else char for char in text).strip()
    out = []
    for index, char in enumerate(text):
        if char in _REFERENCES:
            out.append(_REFERENCES[char])
        elif (
            char in _INLINE_SYNTAX
            or (index == 0 and char in _BLOCK_STARTS)
            or (char == "_" and not _inside_word(text, index))
        ):
            out.append("\\" + char)
        elif char in ".)" and text[:index].isdigit():  # "1. " or "1) " would start an ordered list
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def _inside_word(text: str, index: int) -> bool:
    return 0 < index < len(text) - 1 and text[index - 1].isalnum() and text[index + 1].isalnum()


def escape_model_html(markdown: str) -> str:
    """`markdown` as kramdown renders it with no live HTML and its formatting intact.

    What Markdown shows literally stays byte for byte: code spans, code fences, backslash escapes
    and http(s)/mailto autolinks. Raw HTML (markdown-it's html_inline and html_block) gets its <, >
    and & escaped, so `<script>` is shown as text. The rest is text, where whatever kramdown would
    make live though markdown-it sees no HTML there is made inert, in ways that render the same:
    every `<` becomes `&lt;` (`$<b onclick=...>$` is math to markdown-it, a tag to kramdown); `{:`
    gets a backslash (a kramdown attribute list can add onclick=...); so does the colon after
    javascript, vbscript or data (kramdown keeps it in a link's href, where it breaks the scheme);
    and a character reference to a letter, a colon or a line break (java&#115;cript:) gets its &
    escaped.

    Code is kept as code only where kramdown is sure to read it as markdown-it does. Any other
    fence (see _fences) becomes an HTML <pre><code> block with its code escaped, which shows the
    same code in any reading, without kramdown's highlighting. Code spans kramdown may read
    otherwise (see _mark_code_spans), indented code, and prose markdown-it cannot locate (tabs in
    indentation) are treated as text: at worst a `<` in such code shows as `&lt;`.

    Apply it once, to the final text: the HTML it writes for a fence is raw HTML to a second pass.
    """
    source, pieces = locate(markdown)
    zones = bytearray(len(source))  # _TEXT everywhere to begin with
    for piece in pieces:
        if piece.kind == "html_block":
            _mark_html_block(piece, source, zones)
        elif piece.kind == "html_inline":
            zones[piece.start : piece.end] = bytes([_HTML]) * (piece.end - piece.start)
        elif piece.kind == "escape" or (piece.kind == "autolink" and _safe_autolink(piece)):
            zones[piece.start : piece.end] = bytes([_LITERAL]) * (piece.end - piece.start)
    rewritten = _fences(source, pieces, zones)
    _mark_code_spans(source, pieces, zones)
    out, position = [], 0
    for start, end, replacement in rewritten:
        out += [_escape(source, zones, position, start), replacement]
        position = end
    out.append(_escape(source, zones, position, len(source)))
    return "".join(out)


def _escape(source: str, zones: bytearray, start: int, end: int) -> str:
    """source[start:end], each character escaped as its zone needs."""
    out = []
    for index in range(start, end):
        char, zone = source[index], zones[index]
        if zone == _LITERAL:
            out.append(char)
        elif char == "<" or (char == ">" and zone == _HTML):
            out.append(html.escape(char))
        elif char == "&" and (zone == _HTML or _refers_to_scheme_character(source, index)):
            out.append("&amp;")
        elif _needs_backslash(source, index):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# What stays literal
# ---------------------------------------------------------------------------------------------


def _safe_autolink(piece: Located) -> bool:
    return str(piece.tokens[0].attrs.get("href", "")).lower().startswith(SAFE_AUTOLINKS)


def _mark_code_spans(source: str, pieces: list[Located], zones: bytearray) -> None:
    """Mark the code spans kramdown is sure to read as markdown-it does as literal.

    kramdown ends a code span at the first run of its delimiter's length, even inside a longer
    run; reads a single backtick before a space as a plain backtick; may start a list or a table
    on the next line of a paragraph; matches `~~` and `$$` before code spans; and may pair a
    backtick markdown-it left as text with one of a later span's, even in another block (a list's
    lazy continuation). So a code span stays literal only on one line, without those inside it,
    and with no backtick before it outside what is already literal or rewritten."""
    position, stray = 0, False
    for piece in sorted((p for p in pieces if p.kind == "backticks"), key=lambda p: p.start):
        stray = stray or any(
            source[index] == "`" and zones[index] in (_TEXT, _HTML) for index in range(position, piece.start)
        )
        position = piece.start
        delimiter = piece.tokens[0].markup
        content = source[piece.start + len(delimiter) : piece.end - len(delimiter)]
        if (
            stray
            or delimiter in content
            or any(part in content for part in ("\n", "~~", "$$"))
            or (delimiter == "`" and content[:1].isspace())
        ):
            continue
        zones[piece.start : piece.end] = bytes([_LITERAL]) * (piece.end - piece.start)


def _fences(source: str, pieces: list[Located], zones: bytearray) -> list[tuple[int, int, str]]:
    """Mark the code fences kramdown is sure to read as markdown-it does as literal; return each
    other one as (start, end, the HTML block that replaces it), in order.

    kramdown nests and continues blocks by rules of its own. A fence is sure to be one when it is
    closed, its info string is one word, it starts at the left margin outside lists and quotes,
    right after a blank line or a one-line paragraph or heading that itself follows a blank line
    (kramdown starts lists and quotes inside what markdown-it calls a paragraph, and takes what
    follows for their lazy continuation), and no ``` or ~~~ comes before it outside fences
    (kramdown may open a fence there and close it on this one's first line)."""
    lines = source.split("\n")
    prose_lines = {
        piece.tokens[0].map[0]
        for piece in pieces
        if piece.kind in ("paragraph_open", "heading_open")
        and piece.tokens[0].map[1] - piece.tokens[0].map[0] == 1
        and _after_blank(lines, piece.tokens[0])
    }
    rewritten, checked, trusted = [], 0, True
    for piece in pieces:
        if piece.kind != "fence":
            continue
        token = piece.tokens[0]
        trusted = trusted and "```" not in source[checked : piece.start] and "~~~" not in source[checked : piece.start]
        # A closed fence's content leaves out its first and last lines; an unclosed one runs to the end.
        content_lines = len(token.content.removesuffix("\n").split("\n")) if token.content else 0
        closed = content_lines == token.map[1] - token.map[0] - 2
        if (
            trusted
            and closed
            and len(token.info.split()) <= 1
            and lines[token.map[0]].startswith(token.markup)
            and (_after_blank(lines, token) or token.map[0] - 1 in prose_lines)
        ):
            zones[piece.start : piece.end] = bytes([_LITERAL]) * (piece.end - piece.start)
        elif (replacement := _fence_as_html(source, piece)) is not None:
            zones[piece.start : piece.end] = bytes([_REWRITTEN]) * (piece.end - piece.start)
            rewritten.append((piece.start, piece.end, replacement))
        else:
            continue  # its lines cannot be matched to its code: it stays text, its ``` included
        checked = piece.end
    return rewritten


def _after_blank(lines: list[str], token) -> bool:
    """Whether a block token is top-level, starts at the left margin, and follows a blank line or
    nothing."""
    first = token.map[0]
    return token.level == 0 and lines[first][:1] not in (" ", "\t") and (first == 0 or not lines[first - 1].strip())


def _fence_as_html(source: str, piece: Located) -> str | None:
    """A fence as an HTML <pre><code> block, its code escaped, on the same lines behind the same
    quote markers and indentation, blank lines kept blank (they end lists and quotes); None where
    its lines cannot be matched to its code (tabs)."""
    token = piece.tokens[0]
    text = source[piece.start : piece.end]
    lines = text.removesuffix("\n").split("\n")
    code = token.content.removesuffix("\n").split("\n") if token.content else []
    body = []
    for line, code_line in zip(lines[1:], code):
        if not line.endswith(code_line):
            return None
        body.append(line[: len(line) - len(code_line)] + html.escape(code_line, quote=False))
    words = token.info.split()
    language = words[0] if words and all(char.isalnum() or char in "+-._" for char in words[0]) else ""
    tag = (
        lines[0][: lines[0].index(token.markup)] + "<pre><code" + (f' class="language-{language}"' if language else "")
    )
    # The first line of code goes on the tag's line (a line break right after <code> would show).
    block = [tag + ">" + (html.escape(code[0], quote=False) if code else "")] + body[1:]
    if len(lines) > 1 + len(code):  # closed: the end tag takes the closing fence's line
        closing = lines[1 + len(code)]
        block.append(closing[: closing.index(token.markup[0])] + "</code></pre>")
    else:
        last = max((index for index, code_line in enumerate(code) if code_line.strip()), default=0)
        block[last] += "</code></pre>"
    return "\n".join(block) + ("\n" if text.endswith("\n") else "")


def _mark_html_block(piece: Located, source: str, zones: bytearray) -> None:
    """Mark an HTML block's own text, line by line: the quote markers before it stay Markdown."""
    start = piece.start
    lines = source[piece.start : piece.end].split("\n")
    for line, content in zip(lines, piece.tokens[0].content.split("\n")):
        if line.endswith(content):
            zones[start + len(line) - len(content) : start + len(line)] = bytes([_HTML]) * len(content)
        start += len(line) + 1


# ---------------------------------------------------------------------------------------------
# What text escaping changes
# ---------------------------------------------------------------------------------------------


def _needs_backslash(source: str, index: int) -> bool:
    """Whether source[index] opens `{:` (a kramdown attribute list or extension) or is the colon of a
    script scheme, and no backslash escapes it yet."""
    char = source[index]
    if not ((char == "{" and source.startswith(":", index + 1)) or (char == ":" and _ends_scheme(source, index))):
        return False
    backslashes = 0
    while index - backslashes > 0 and source[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 0


def _ends_scheme(source: str, colon: int) -> bool:
    """Whether the letters before source[colon], across SCHEME_GAPS, end with a script scheme."""
    letters, index = [], colon - 1
    while index >= 0 and len(letters) < _LONGEST_SCHEME:
        char = source[index]
        if char.isascii() and char.isalpha():
            letters.append(char.lower())
        elif char not in SCHEME_GAPS:
            break
        index -= 1
    return "".join(reversed(letters)).endswith(SCRIPT_SCHEMES)


def _refers_to_scheme_character(source: str, amp: int) -> bool:
    """Whether source[amp:] starts with a character reference, as a browser reads one in an href
    (numeric ones need no `;`), to a letter, a colon or a tab or line break."""
    end = amp + 1
    if source.startswith("#", end):
        end += 1
        digits = "0123456789"
        if source[end : end + 1] in ("x", "X"):
            end, digits = end + 1, "0123456789abcdefABCDEF"
        while end < len(source) and source[end] in digits:
            end += 1
    else:
        while end < len(source) and source[end].isascii() and source[end].isalnum():
            end += 1
    if source.startswith(";", end):
        end += 1
    char = html.unescape(source[amp:end])[:1]
    return char != "&" and char.isascii() and (char.isalpha() or char in ":\t\n\r")
