"""The explain use case: a source file -> chunks -> one model request per chunk, plus one for the
introduction -> a Post.

No request depends on another's answer. Each chunk prompt carries what a reader has on screen:
the enclosing definition with the chunk marked, the same-file functions the chunk calls, and one
line per earlier chunk made from the code itself (not from an earlier answer). So the local
backend can batch every request of a post into one generate call, the API backend can send them
all at once, and a cached answer stays valid when another chunk's answer changes.

Answers are checked for grounding: a name the explanation puts in backticks that appears nowhere
in what the model was shown is reported, because small models invent plausible API names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import date as Date
from functools import cache
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt

from explainer.backends import Backend, Completion, Request, UnusableAnswer, Usage
from explainer.cache import Cache, complete_cached, key_for
from explainer.chunking import (
    CODE_LANGUAGES,
    Chunk,
    ChunkedFile,
    Symbol,
    chunk_file,
    comments_in,
    enclosing_view,
    identifiers_in,
    numbered_lines,
)
from explainer.languages import Language, language
from explainer.markdown_segments import UnreadableMarkdown, placeholder_numbers, read_markdown, split_document
from explainer.post import Post, Section
from explainer.render import fenced
from explainer.safe_markdown import escape_model_html

log = logging.getLogger(__name__)

SUMMARY_WIDTH = 72  # characters of code in an earlier chunk's one-line summary
MAX_EARLIER = 20  # earlier chunks summarised in a prompt: the nearest ones matter most
MAX_DEFINITIONS = 40  # signatures listed in the overview prompt
# A longer enclosing definition is shown as its signature and the lines around the chunk: prompt
# tokens are what a local model on a CPU pays for most, and earlier chunks are summarised anyway.
MAX_VIEW_LINES = 60
# A definition up to this long is shown whole, numbered, at the start of every request about it
# (~2,000 tokens of Python); a longer one gets a per-piece view of MAX_VIEW_LINES.
MAX_DEFINITION_LINES = 160
VIEW_CONTEXT_LINES = 4
ELISION = "   ⋮"

EXPLAIN_TEMPERATURE = 0.0
INTRO_SENTENCES = 3  # overview.j2 asks for "two or three sentences"

NAME_SEPARATORS = ("::", "->")  # turned into "." before a backticked name is split into parts


ProgressCallback = Callable[[int, int], None]  # (answers so far, requests in all)
WarningCallback = Callable[[str], None]


def explain_file(
    path: str | os.PathLike,
    symbol: str | None = None,
    *,
    backend: Backend,
    cache: Cache | None = None,
    lang: str = "en",
    max_lines: int = 30,
    max_tokens: int = Request.max_tokens,
    usage: Usage | None = None,
    date: str | None = None,
    on_progress: ProgressCallback | None = None,
    on_warning: WarningCallback | None = None,
    display_path: str | None = None,
) -> tuple[Post, Usage]:
    """Explain a source file (or one symbol in it) chunk by chunk, in language `lang`.

    Returns the Post and the Usage of this run (requests sent, cache hits, tokens). Warnings
    (syntax errors in the file, names an explanation invented) go to on_warning, by default
    to this module's logger; progress goes to on_progress(done, total) as answers arrive.
    display_path is how prompts, cache keys and the post name the file (default: `path`, relative
    to the current folder where it lies inside it), so where a checkout lives never reaches a model.
    """
    warn = on_warning or log.warning
    answer_lang = language(lang)
    # The path as shown (relative where possible) is what prompts, cache keys and the post carry.
    chunked = chunk_file(path, symbol=symbol, max_lines=max_lines, display_path=display_path or _display_path(path))
    for warning in chunked.warnings:
        warn(warning)
    # The overview first: it is the longest answer, and a local model that batches requests would
    # otherwise start it last and spend its final steps on it alone.
    requests = [overview_request(chunked, symbol, answer_lang, max_tokens)]
    requests += [chunk_request(chunked, index, answer_lang, max_tokens) for index in range(len(chunked.chunks))]

    usage = usage if usage is not None else Usage()
    answered = 0

    answers: list = [None] * len(requests)

    def arrived(index, completion):
        nonlocal answered  # complete_cached never calls this from two threads at once
        answers[index] = completion
        answered += 1
        if on_progress is not None:
            on_progress(answered, len(requests))

    if on_progress is not None:
        on_progress(0, len(requests))
    try:
        complete_cached(backend, requests, cache, usage, on_done=arrived, unusable=unreadable)
    except UnusableAnswer:
        # One more try for what is missing, asking firmly for less: a small model that ran past
        # max_tokens usually restated the code; a second failure fails the post.
        missing = [index for index, answer in enumerate(answers) if answer is None]
        warn(
            f"{chunked.path}: {len(missing)} of {len(requests)} answers were unusable (cut off, empty or "
            "unreadable as Markdown); asking again for shorter ones"
        )
        retries = [firmer(requests[index]) for index in missing]

        def retried(k, completion):
            # kept under the first request's key too, so that a rerun is answered from the cache
            if cache is not None:
                cache.put(key_for(backend, requests[missing[k]]), completion)
            arrived(missing[k], completion)

        complete_cached(backend, retries, cache, usage, on_done=retried, unusable=unreadable)

    # One more ask for an answer about something else than its lines (off_piece); the new answer is kept,
    # under the first request's key too, only where it is about its lines.
    strays = {
        index: reason
        for index, chunk in enumerate(chunked.chunks, start=1)
        if (reason := off_piece(chunked, chunk, answers[index].text)) is not None
    }
    if strays:
        usage.extra["off_piece"] = usage.extra.get("off_piece", 0) + len(strays)
        order = list(strays)
        again = [on_its_lines(requests[index], chunked.chunks[index - 1], strays[index]) for index in order]

        def answered_again(k, completion):
            index = order[k]
            if off_piece(chunked, chunked.chunks[index - 1], completion.text) is None:
                answers[index] = completion
                del strays[index]
                if cache is not None:
                    cache.put(key_for(backend, requests[index]), completion)

        try:
            complete_cached(backend, again, cache, usage, on_done=answered_again, unusable=unreadable)
        except UnusableAnswer:
            pass  # the first answer stays
        for index, reason in strays.items():
            chunk = chunked.chunks[index - 1]
            warn(
                f"{chunked.path}, {_lines(chunk.start_line, chunk.end_line)}: asked twice, {reason}; "
                "check it in the post"
            )

    sections = [_section(chunked, chunk, answer.text, warn) for chunk, answer in zip(chunked.chunks, answers[1:])]
    title, intro = split_title(answers[0].text, default=symbol or Path(chunked.path).name)
    intro, intro_left_out = budget_split(opening_paragraph(intro), INTRO_SENTENCES)
    whole = "\n".join(
        [c.code for c in chunked.chunks] + [_signature_text(chunked.code_language, s) for s in chunked.symbols]
    )
    invented = ungrounded_names(intro, whole, known_names(chunked))
    if invented:
        warn(
            f"{chunked.path}: the introduction mentions {_quoted(invented)}, which the code does not contain; "
            "check these names in the post"
        )
    post = Post(
        title=title,
        lang=answer_lang.code,
        date=date or Date.today().isoformat(),
        source_path=chunked.path,
        code_language=chunked.code_language,
        intro=intro,
        intro_left_out=intro_left_out,
        sections=sections,
        backend=backend.name,
        model=backend.model,
    )
    return post, usage


def _section(chunked: ChunkedFile, chunk: Chunk, answer: str, warn: WarningCallback) -> Section:
    explanation = answer.strip()
    left_out = ""
    if chunk.kind not in UNCUT_KINDS:
        explanation, left_out = budget_split(explanation, sentence_count(chunk))
    invented = ungrounded_names(explanation, grounding_text(chunked, chunk), known_names(chunked))
    if invented:
        warn(
            f"{chunked.path}, {_lines(chunk.start_line, chunk.end_line)}: the explanation mentions "
            f"{_quoted(invented)}, which the code it was shown does not contain; check these names in the post"
        )
    return Section(
        code=chunk.code,
        code_language=chunk.code_language,
        start_line=chunk.start_line,
        end_line=chunk.end_line,
        symbol=chunk.symbol,
        kind=chunk.kind,
        explanation=explanation,
        ungrounded=invented,
        left_out=left_out,
    )


def _quoted(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@cache
def _prompt_templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("explainer", "templates/prompts"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["fenced"] = fenced
    return environment


def _render(template: str, **values) -> str:
    return _prompt_templates().get_template(template).render(**values).strip() + "\n"


def system_prompt(chunked: ChunkedFile, answer_lang: Language) -> str:
    glossary = ""
    if answer_lang.code != "en":  # English explanations use the terms as they are
        glossary = "; ".join(f"{term} → {written}" for term, written in sorted(answer_lang.glossary.items()))
    return _render(
        "system.j2",
        code_language_label=CODE_LANGUAGES[chunked.code_language].label,
        answer_lang_label=_lang_label(answer_lang),
        glossary=glossary,
    )


def chunk_request(chunked: ChunkedFile, index: int, answer_lang: Language, max_tokens: int) -> Request:
    """The request that explains chunk number `index` of `chunked`.

    Requests about pieces of one definition start with the same bytes (system prompt, file, the
    whole numbered definition, its callees: _context.j2); what differs per piece comes last."""
    chunk = chunked.chunks[index]
    owner = owner_symbol(chunked, chunk)
    # A chunk that is its whole definition needs no surrounding view: it would repeat the chunk.
    is_part = owner is not None and _is_part_of(chunk, owner)
    if is_part and _shown_whole(owner):
        context, marked_view = symbol_context(chunked, owner), ""
    else:
        context = {
            "symbol": "",
            "definition": "",
            "callees": [_signature_text(chunked.code_language, s) for s in callees(chunked, chunk)],
        }
        marked_view = chunk_view(chunked, chunk, owner) if is_part else ""
    earlier = [summary_line(c) for c in chunked.chunks[max(0, index - MAX_EARLIER) : index]]
    user = _render(
        "chunk.j2",
        path=chunked.path,
        code_language=chunked.code_language,
        chunk=chunk,
        **context,
        marked_view=marked_view,
        lines=_lines(chunk.start_line, chunk.end_line),
        definition_kind=owner.kind if owner is not None else "",
        earlier=earlier,
        budget=sentence_budget(chunk),
        answer_lang_label=_lang_label(answer_lang),
    )
    return _request(chunked, answer_lang, user, max_tokens)


# Sentences an explanation may take, by the piece's lines of code: a small model pads a long answer
# with claims the code does not make, so the budget grows with what there is to say, not with room.
SENTENCE_BUDGET = ((2, 1), (5, 2), (12, 3), (30, 4))
MAX_SENTENCES = 6
# Answers kept whole past their budget: a signature's is a sentence and a list of parameters; a whole
# definition's walks through all of it, and cutting it cost key points that no false sentence paid for
# (benchmarks/results/audit.md, lever 2).
UNCUT_KINDS = ("signature", "function", "class")


def sentence_count(chunk: Chunk) -> int:
    """The sentences an explanation of `chunk` may take, by its non-blank lines; conditions and loops get
    two at least (the condition and its cases; one pass and when it stops)."""
    lines = sum(1 for line in chunk.code.splitlines() if line.strip())
    count = next((n for most, n in SENTENCE_BUDGET if lines <= most), MAX_SENTENCES)
    if chunk.kind in ("for", "while", "do", "if", "switch", "match", "try", "function", "class"):
        count = max(count, 2)
    return count


def sentence_budget(chunk: Chunk) -> str:
    """'one sentence' or 'at most N sentences': sentence_count as the prompt says it."""
    count = sentence_count(chunk)
    return "one sentence" if count == 1 else f"at most {NUMBERS[count]} sentences"


# What ends a sentence: these, then a space or the end (closing quotes and brackets may come between).
SENTENCE_ENDS = ".!?"
# These end one wherever they stand (Chinese and Japanese full stops, Hindi's danda).
SENTENCE_ENDS_UNSPACED = "。！？।"
SENTENCE_CLOSERS = "\"'”’)]»」』"
ABBREVIATIONS = ("e.g.", "i.e.", "cf.", "vs.")


def sentence_ends(text: str) -> list[int]:
    """Where each sentence of a paragraph's prose ends (the offset after its closing mark). Code spans
    must be out of the text already (markdown_segments' placeholders), so `self.model` ends nothing;
    the last sentence ends at the end of the text whether it has a mark or not."""
    ends: list[int] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char in SENTENCE_ENDS_UNSPACED or char in SENTENCE_ENDS:
            end = index + 1
            while end < len(text) and text[end] in SENTENCE_CLOSERS:
                end += 1
            spaced = end == len(text) or text[end].isspace()
            abbreviated = char == "." and any(text[: index + 1].lower().endswith(a) for a in ABBREVIATIONS)
            if char in SENTENCE_ENDS_UNSPACED or (spaced and not abbreviated):
                ends.append(end)
            index = end
        else:
            index += 1
    if text.strip() and (not ends or text[ends[-1] :].strip()):
        ends.append(len(text.rstrip()))
    return ends


def budget_split(answer: str, most: int) -> tuple[str, str]:
    """(the answer's first `most` sentences, the rest), where it is plain paragraphs; an answer with a list,
    a heading or code, or whose cut would fall inside a link, is kept whole: (answer, ""). A small model asked
    for two sentences often writes six, and the ones past its budget are where it drifts from the code
    (benchmarks/results/audit.md: 7 of the lever-1 post's 16 false sentences)."""
    tokens = read_markdown(_markdown(), answer)
    if any(t.type not in ("paragraph_open", "inline", "paragraph_close") for t in tokens):
        return answer, ""
    document = split_document(answer)
    kept: dict[int, str] = {}
    rest: list[str] = []
    left = most
    for index, segment in enumerate(document.segments):
        if left <= 0:
            kept[index] = ""
            rest.append(document.source[segment.start : segment.end].strip())
            continue
        ends = sentence_ends(segment.text)
        if len(ends) <= left:
            left -= len(ends)
            continue
        text = segment.text[: ends[left - 1]]
        shown = set(placeholder_numbers(text) or ())
        if any((opening in shown) != (closing in shown) for opening, closing in segment.pairs):
            return answer, ""
        kept[index] = segment.restore(text)
        rest.append(segment.restore(segment.text[ends[left - 1] :]).strip())
        left = 0
    if not kept:
        return answer, ""
    cut = document.rebuild(kept).strip()
    while "\n\n\n" in cut:
        cut = cut.replace("\n\n\n", "\n\n")
    return cut, "\n\n".join(part for part in rest if part)


NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def overview_request(chunked: ChunkedFile, symbol: str | None, answer_lang: Language, max_tokens: int) -> Request:
    """The request for the post's title and introduction: for one symbol, it starts like the
    requests about its pieces."""
    owner = next((s for s in chunked.symbols if s.name == symbol), None) if symbol else None
    if owner is not None and _shown_whole(owner):
        context, definitions = symbol_context(chunked, owner), []
    else:
        context = {"symbol": "", "definition": "", "callees": []}
        definitions = [_signature_text(chunked.code_language, s) for s in _covered_symbols(chunked)]
    user = _render(
        "overview.j2",
        path=chunked.path,
        code_language=chunked.code_language,
        **context,
        post_symbol=symbol or "",
        definitions=definitions,
        pieces=[summary_line(c) for c in chunked.chunks],
        answer_lang_label=_lang_label(answer_lang),
    )
    return _request(chunked, answer_lang, user, max_tokens)


def _shown_whole(owner: Symbol) -> bool:
    return owner.end_line - owner.start_line + 1 <= MAX_DEFINITION_LINES


def symbol_context(chunked: ChunkedFile, owner: Symbol) -> dict:
    """What every request about `owner` shares: its numbered lines, and what any of its pieces calls."""
    called: dict[str, Symbol] = {}
    for chunk in chunked.chunks:
        if owner_symbol(chunked, chunk) is owner:
            for symbol in callees(chunked, chunk):
                called.setdefault(symbol.name, symbol)
    return {
        "symbol": owner.name,
        "definition": numbered_lines(chunked, owner.start_line, owner.end_line),
        "callees": [_signature_text(chunked.code_language, s) for s in called.values()],
    }


def firmer(request: Request) -> Request:
    """The same request, its last message ending with a firm instruction to be brief."""
    *earlier, last = request.messages
    words = max(40, request.max_tokens // 4)
    note = (
        f"\n\nYour answer must be short: at most {words} words, no code, no headings. "
        "Stop as soon as the point is made."
    )
    return replace(request, messages=(*earlier, {**last, "content": last["content"] + note}))


def on_its_lines(request: Request, chunk: Chunk, reason: str) -> Request:
    """The same request, its last message ending with why the first answer missed its lines."""
    *earlier, last = request.messages
    lines = _lines(chunk.start_line, chunk.end_line)
    note = (
        f"\n\nAn earlier answer was not about {lines}: {reason}. Explain {lines} alone, "
        "naming the variables and calls they use."
    )
    return replace(request, messages=(*earlier, {**last, "content": last["content"] + note}))


def _request(chunked: ChunkedFile, answer_lang: Language, user: str, max_tokens: int) -> Request:
    messages = ({"role": "system", "content": system_prompt(chunked, answer_lang)}, {"role": "user", "content": user})
    # Greedy: sampling lets a small model wander off what the code says (benchmarks/results/audit.md)
    return Request(messages=messages, max_tokens=max_tokens, temperature=EXPLAIN_TEMPERATURE)


def _lang_label(lang: Language) -> str:
    if lang.english_name == lang.name:
        return lang.name
    return f"{lang.english_name} ({lang.name})"


def chunk_view(chunked: ChunkedFile, chunk: Chunk, owner: Symbol) -> str:
    """The enclosing definition, numbered, with the chunk marked (chunking.enclosing_view); past
    MAX_VIEW_LINES only its signature and the chunk with a few lines around it, gaps shown as ⋮."""
    view = enclosing_view(chunked, chunk).split("\n")
    if len(view) <= MAX_VIEW_LINES:
        return "\n".join(view)
    first = min(chunk.start_line, owner.start_line)  # the line number of view[0]
    signature_end = owner.start_line + owner.signature.count("\n")
    shown: list[str] = []
    for number, line in enumerate(view, start=first):
        near = chunk.start_line - VIEW_CONTEXT_LINES <= number <= chunk.end_line + VIEW_CONTEXT_LINES
        if number <= signature_end or near:
            shown.append(line)
        elif shown[-1:] != [ELISION]:
            shown.append(ELISION)
    return "\n".join(shown)


def summary_line(chunk: Chunk) -> str:
    """One line that names a chunk without asking the model: its lines and its first line of code."""
    lines = [line.strip() for line in chunk.code.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > SUMMARY_WIDTH:
        first = first[: SUMMARY_WIDTH - 1] + "…"
    elif len(lines) > 1:
        first += " …"
    return f"{_lines(chunk.start_line, chunk.end_line)} ({chunk.kind}): {first}"


def _lines(start: int, end: int) -> str:
    return f"line {start}" if start == end else f"lines {start}-{end}"


def owner_symbol(chunked: ChunkedFile, chunk: Chunk) -> Symbol | None:
    """The definition a chunk belongs to (None at module level)."""
    return next(
        (
            s
            for s in chunked.symbols
            if s.name == chunk.symbol and s.start_line <= chunk.end_line and chunk.start_line <= s.end_line
        ),
        None,
    )


def _is_part_of(chunk: Chunk, owner: Symbol) -> bool:
    return owner.start_line < chunk.start_line or chunk.end_line < owner.end_line


def callees(chunked: ChunkedFile, chunk: Chunk) -> list[Symbol]:
    """The same-file definitions a chunk calls, other than its own."""
    by_name = {}
    for symbol in chunked.symbols:
        by_name.setdefault(symbol.name, symbol)
    return [by_name[name] for name in chunk.calls if name in by_name and name != chunk.symbol]


def _signature_text(code_language: str, symbol: Symbol) -> str:
    """A definition's signature with its docstring (Python: below it; C family: the comment above)."""
    if not symbol.docstring:
        return symbol.signature
    if code_language == "python":
        indent = symbol.signature[: len(symbol.signature) - len(symbol.signature.lstrip())]
        return f"{symbol.signature}\n{indent}    {symbol.docstring}"
    return f"{symbol.docstring}\n{symbol.signature}"


def _covered_symbols(chunked: ChunkedFile) -> list[Symbol]:
    """Definitions inside the explained lines, outermost first, at most MAX_DEFINITIONS."""
    first = min(c.start_line for c in chunked.chunks)
    last = max(c.end_line for c in chunked.chunks)
    return [s for s in chunked.symbols if first <= s.start_line and s.end_line <= last][:MAX_DEFINITIONS]


def _display_path(path: str | os.PathLike) -> str:
    """The path as the post shows it. An absolute path is shown relative to the current folder when it
    lies inside it, else relative to its project (the nearest folder above it with a .git), else by
    its name alone: where the writer's checkout lives never reaches a post or a model."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    resolved = path.resolve()
    for root in (Path.cwd().resolve(), *(p for p in resolved.parents if (p / ".git").exists())):
        try:
            return resolved.relative_to(root).as_posix()
        except ValueError:
            continue
    return resolved.name


# ---------------------------------------------------------------------------------------------
# The overview answer: title and introduction
# ---------------------------------------------------------------------------------------------


@cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark")


def unreadable(answer: Completion) -> str | None:
    """Why an answer cannot go into a post (None if it can): markdown-it-py fails on it, where the
    post reads it (its title, its backticked names, its escaping for the site)."""
    text = answer.text.strip()
    try:
        _, intro = split_title(text, default="")
        for part in {text, intro}:
            backticked(part)
            escape_model_html(part)
    except UnreadableMarkdown as exc:
        return f"the answer is text that {exc}"
    return None


def split_title(answer: str, default: str) -> tuple[str, str]:
    """(title, introduction) from an answer that should open with a heading; without one, the
    whole answer is the introduction and `default` the title."""
    text = answer.strip()
    tokens = read_markdown(_markdown(), text)
    if len(tokens) < 2 or tokens[0].type != "heading_open" or tokens[0].map is None:
        return default, text
    title = tokens[1].content.strip() or default
    rest = text.splitlines()[tokens[0].map[1] :]
    return title, "\n".join(rest).strip()


def opening_paragraph(intro: str) -> str:
    """The first paragraph of an introduction, which the prompt asks to be one paragraph: a small model
    goes on with headings and step lists that restate the pieces, and each restatement is a new chance to
    misread them (benchmarks/results/audit.md). Without a paragraph, the introduction as it is."""
    tokens = read_markdown(_markdown(), intro)
    first = next((t for t in tokens if t.type == "paragraph_open" and t.level == 0 and t.map is not None), None)
    if first is None or first.map is None:
        return intro
    return "\n".join(intro.splitlines()[first.map[0] : first.map[1]]).strip()


# ---------------------------------------------------------------------------------------------
# Grounding: names in backticks that the model was never shown
# ---------------------------------------------------------------------------------------------


def grounding_text(chunked: ChunkedFile, chunk: Chunk) -> str:
    """Everything the model saw of the code for this chunk: the chunk, its enclosing definition
    and the signatures and docstrings of what it calls."""
    owner = owner_symbol(chunked, chunk)
    parts = [chunk.code, owner.text if owner is not None else ""]
    parts += [_signature_text(chunked.code_language, s) for s in callees(chunked, chunk)]
    return "\n".join(parts)


def known_names(chunked: ChunkedFile) -> frozenset[str]:
    """Names that are real even where they do not occur as written: qualified definition names
    (`Llama.generate`), the file's name, and its programming language's keywords and builtins."""
    names = {s.name for s in chunked.symbols} | {Path(chunked.path).name, Path(chunked.path).stem}
    return frozenset(names | CODE_LANGUAGES[chunked.code_language].keywords)


def backticked(markdown: str) -> list[str]:
    """The inline code spans of a Markdown text, in order."""
    spans = []
    for token in read_markdown(_markdown(), markdown):
        spans += [child.content for child in token.children or () if child.type == "code_inline"]
    return spans


def name_in(span: str) -> str | None:
    """The name a backticked span holds (`x`, `self.model.params`, `Llama::generate`,
    `sample_top_p()`), or None when it holds anything else: an expression, a literal, a path."""
    name = span.strip()
    if name.endswith("()"):
        name = name[:-2]
    dotted = name
    for separator in NAME_SEPARATORS:
        dotted = dotted.replace(separator, ".")
    parts = dotted.split(".")
    if not all(part.isascii() and part.isidentifier() for part in parts):
        return None
    return name


def _is_name_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def occurs_as_name(name: str, text: str) -> bool:
    """Whether `name` occurs in `text` not as part of a longer name: `model.params` occurs in
    `self.model.params`, `param` does not occur in `params`."""
    start = text.find(name)
    while start != -1:
        end = start + len(name)
        before = text[start - 1] if start > 0 else " "
        after = text[end] if end < len(text) else " "
        if not _is_name_char(before) and not _is_name_char(after):
            return True
        start = text.find(name, start + 1)
    return False


def ungrounded_names(explanation: str, context: str, known: frozenset[str] = frozenset()) -> list[str]:
    """Names the explanation puts in backticks that occur nowhere in `context` and are not
    `known`, each once, in order of first mention."""
    invented: list[str] = []
    for span in backticked(explanation):
        name = name_in(span)
        if name is None or name in known or name in invented or occurs_as_name(name, context):
            continue
        invented.append(name)
    return invented


# ---------------------------------------------------------------------------------------------
# Answers about their piece
# ---------------------------------------------------------------------------------------------

# An answer that names this many of its definition's names that its own lines do not hold (and more of
# them than of its own lines') describes the whole definition, not its piece.
OFF_PIECE_NAMES = 3
# An answer whose runs of three words come this much from the docstring or comments restates them.
RESTATED_SHARE = 0.5
# A piece whose statements use this many names of their own, none of which its answer says, was not read.
UNMENTIONED_BODY_NAMES = 3


def off_piece(chunked: ChunkedFile, chunk: Chunk, answer: str) -> str | None:
    """Why an explanation is not about its piece's lines, or None: it names more of the rest of its
    definition than of its lines, or the definition itself and none of its lines' names, or it only restates
    the docstring or comments the piece shows."""
    owner = owner_symbol(chunked, chunk)
    known = known_names(chunked)
    if owner is not None and _is_part_of(chunk, owner):
        inside: list[str] = []
        outside: list[str] = []
        named = [name_in(span) for span in backticked(answer)]
        for name in named:
            if name is None or name in known or name in inside or name in outside:
                continue
            if occurs_as_name(name, chunk.code):
                inside.append(name)
            elif occurs_as_name(name, owner.text):
                outside.append(name)
        if len(outside) >= OFF_PIECE_NAMES and len(outside) > len(inside):
            return f"it describes code outside {_lines(chunk.start_line, chunk.end_line)} ({_quoted(outside)})"
        # "The `Llama.generate` function is a method that generates ...": the definition as a whole, and not
        # one name of the piece's own
        short = owner.name.replace("::", ".").rpartition(".")[2]
        if not inside and (owner.name in named or (short in named and not occurs_as_name(short, chunk.code))):
            return f"it describes `{owner.name}` as a whole, not {_lines(chunk.start_line, chunk.end_line)}"
    if chunk.kind != "signature":
        words = prose_words(answer)
        said = _trigrams(words)
        notes = _trigrams(_words(comment_text(chunked, chunk, owner)))
        if said and notes and len(said & notes) >= RESTATED_SHARE * len(said):
            return "it restates the docstring or comments instead of explaining the code"
        body = body_names(chunked, chunk, owner)
        if len(body) >= UNMENTIONED_BODY_NAMES and not any(_says(words, name) for name in body):
            return "it names nothing the code of these lines uses: it restates the docstring or the signature"
    return None


def body_names(chunked: ChunkedFile, chunk: Chunk, owner: Symbol | None) -> list[str]:
    """The names of three letters or more that the piece's statements use and its definition's signature
    does not: an answer about these lines can hardly help saying one of them, or a word that starts like one."""
    signature = owner.signature if owner is not None else ""
    keywords = CODE_LANGUAGES[chunked.code_language].keywords
    return [
        name
        for name in identifiers_in(chunked, chunk.start_line, chunk.end_line)
        if len(name) >= 3 and name not in keywords and not occurs_as_name(name, signature)
    ]


def _says(words: list[str], name: str) -> bool:
    """Whether the words say `name` or one of its parts (min_prompt_len: min, prompt, len), or a word
    that starts with one ("flushes" says flush)."""
    parts = {name.lower()} | {part for part in name.lower().split("_") if len(part) >= 3}
    return any(word.startswith(part) for word in words for part in parts)


def comment_text(chunked: ChunkedFile, chunk: Chunk, owner: Symbol | None) -> str:
    """The docstring the piece shows (its definition's, where the piece holds it) and its comments."""
    parts = [owner.docstring] if owner is not None and owner.docstring and owner.docstring in chunk.code else []
    parts += comments_in(chunked, chunk.start_line, chunk.end_line)
    return "\n".join(parts)


def prose_words(markdown: str) -> list[str]:
    """The words of a Markdown answer's prose, code spans included, lower case."""
    words: list[str] = []
    for token in read_markdown(_markdown(), markdown):
        for child in token.children or ():
            if child.type in ("text", "code_inline"):
                words += _words(child.content)
    return words


def _words(text: str) -> list[str]:
    return ["".join(c for c in word if c.isalnum() or c == "_") for word in text.lower().split()]


def _trigrams(words: list[str]) -> set[tuple[str, ...]]:
    words = [w for w in words if w]
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}
