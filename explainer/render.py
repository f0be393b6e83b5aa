"""Post data -> Jekyll-ready Markdown: front matter, notices, introduction, then each piece of code
followed by its explanation.

The page is rendered with jinja2 from templates/post.md.j2 (shipped inside the package). Jekyll runs
Liquid over a post before Markdown, code blocks included, so every `{{` and `{%` in code or prose is
escaped here; nothing the model or the source says can run as a Liquid tag on the site. And kramdown
passes raw HTML through, so what the model wrote (the introduction and each explanation) is
published with its HTML escaped by explainer.safe_markdown: a prompt injection in the explained file
cannot put a script on the site. The title goes into the front matter, as data, escaped the same way
(layouts print it with Liquid's `escape`, as examples/site's do, but a theme may print it as HTML).
What the author wrote instead (explainer.edits) is published as written, like a hand-written post.

A post rendered `editable` is one its author may edit where they read it: Liquid comments (which
Jekyll drops) mark where each part starts, and the front matter records a fingerprint of the text
written in each part, so that a later run can tell the author's edits from its own text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import textwrap
from collections.abc import Mapping
from functools import cache
from typing import Any

import jinja2

from explainer import frontmatter
from explainer.languages import language
from explainer.post import Post, piece_ids
from explainer.safe_markdown import escape_model_html, plain_text

# Jekyll runs Liquid over a post before Markdown; a raw block passes text through untouched.
RAW_OPEN, RAW_CLOSE = "{% raw %}", "{% endraw %}"
# How liquid_safe steps around an endraw tag written in the text: close the raw block, print `{%`, reopen.
RAW_STEP = RAW_CLOSE + '{{ "{%" }}' + RAW_OPEN
# An editable post marks where each of its parts starts with an HTML comment: a Markdown viewer (GitHub's,
# an editor's preview) and the site's page show nothing of it, and markdown-it-py reads it as a block of
# its own. An answer cannot forge one: the model's HTML is escaped (safe_markdown.escape_model_html).
MARKER_OPEN, MARKER_CLOSE = "<!-- explainer: ", " -->"
WRITTEN_KEY = "explainer_written"  # the front matter key of an editable post's fingerprints
FINGERPRINT_LENGTH = 12  # hex digits of sha256


def fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run in `text`, so the text cannot close it
    (CommonMark: a closing fence has at least as many backticks as the opening one)."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def fenced(text: str, info: str = "") -> str:
    """`text` as a fenced code block with the given info string (the language)."""
    fence = fence_for(text)
    return f"{fence}{info}\n{text.rstrip(chr(10))}\n{fence}"


def display_code(code: str) -> str:
    """A chunk as the post shows it: without the blank lines around it, and dedented, so a method
    body starts at the left margin like the seed post's snippets. The Post keeps the exact bytes."""
    lines = code.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return textwrap.dedent("\n".join(lines))


def liquid_safe(text: str, inline: bool = False) -> str:
    """`text` as Jekyll will show it literally: wrapped in {% raw %} ... {% endraw %} when it holds a
    Liquid opener (`{{` or `{%`). A block is wrapped on lines of its own, so its fences still start
    their lines; inline=True wraps in place (inside a heading, say).

    Liquid ends a raw block at the first endraw tag, so an endraw tag written in the text itself is
    stepped around: the raw block closes, a Liquid expression prints its `{%`, and a new one opens.
    """
    if "{{" not in text and "{%" not in text:
        return text
    pieces, start = [], 0
    while (opener := text.find("{%", start)) != -1:
        if text[opener + 2 :].lstrip("-").lstrip().startswith("endraw"):
            pieces.append(text[start:opener] + RAW_CLOSE + '{{ "{%" }}' + RAW_OPEN)
            start = opener + 2
        else:
            pieces.append(text[start : opener + 2])
            start = opener + 2
    body = "".join(pieces) + text[start:]
    return f"{RAW_OPEN}{body}{RAW_CLOSE}" if inline else f"{RAW_OPEN}\n{body}\n{RAW_CLOSE}"


def liquid_unsafe(text: str) -> str:
    """The text a block that liquid_safe wrapped was made from; any other text as it is."""
    opening, closing = RAW_OPEN + "\n", "\n" + RAW_CLOSE
    if not (text.startswith(opening) and text.endswith(closing)) or len(text) < len(opening) + len(closing):
        return text
    return text[len(opening) : -len(closing)].replace(RAW_STEP, "{%")


def marker(name: str) -> str:
    """The Liquid comment that starts the part `name` of an editable post: "intro", "pieces" (the line
    that names the source), "piece ID", "demos"."""
    return f"{MARKER_OPEN}{name}{MARKER_CLOSE}"


def fingerprint(text: str) -> str:
    """A short hash of a part's text, its surrounding white space left out: what the front matter of an
    editable post records of each part, to tell an author's edit from what was written."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]


def shown_title(post: Post) -> str:
    """The title as the front matter holds it."""
    return post.title if post.title_authored else escape_model_html(post.title)


def shown_text(text: str, authored: bool) -> str:
    """An introduction or explanation as the post's Markdown holds it: the model's with its HTML escaped,
    the author's as written; Liquid-safe both."""
    return liquid_safe(text if authored else escape_model_html(text))


@cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("explainer", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        liquid_safe=liquid_safe, display_code=display_code, fenced=fenced, escape_model_html=escape_model_html
    )
    return environment


def render_post(
    post: Post,
    *,
    ui: Mapping[str, str] | None = None,
    translated_by: str | None = None,
    direction: str | None = None,
    extra_front_matter: Mapping[str, object] | None = None,
    demos: str = "",
    editable: bool = False,
) -> str:
    """The post as Jekyll Markdown.

    ui: the strings the page shows (default: explainer/translations/<post.lang>.toml, English
    for any it lacks). translated_by: the model that translated the post, named in a line shown
    first (the ui's translation_notice: "ChatGPT helped translate this post."). direction: "rtl" or
    "ltr" (default: the language's); an rtl post says so in its front matter for the layout.
    extra_front_matter: keys added after the standard ones. demos: Markdown of the demos and their
    output, shown last under the ui's demo_output heading. editable: mark each part and record what
    was written in it (see the module docstring), for the post an author edits.

    The names the ui strings are filled with (model, file) are the user's or a model's words, not
    Markdown: they are escaped to show as written (safe_markdown.plain_text).
    """
    lang = language(post.lang)
    strings = {**language("en").ui, **lang.ui, **(ui or {})}
    # the title is the model's words, like the intro: escaped the same way, whatever prints it
    fields: dict[str, object] = {
        "layout": "post",
        "title": shown_title(post),
        "lang": post.lang,
        "date": post.date,
    }
    if (direction or lang.dir) == "rtl":
        fields["dir"] = "rtl"
    fields["reviewed"] = post.reviewed
    if post.stale:
        fields["stale"] = list(post.stale)
    fields.update(extra_front_matter or {})
    intro = shown_text(post.intro, post.intro_authored)
    pieces: list[dict[str, Any]] = [
        {"id": piece_id, "section": section, "text": shown_text(section.explanation, section.authored)}
        for piece_id, section in zip(piece_ids([s.code for s in post.sections]), post.sections)
    ]
    if editable:
        fields[WRITTEN_KEY] = {
            "title": fingerprint(shown_title(post)),
            "intro": fingerprint(intro),
            **{piece["id"]: fingerprint(piece["text"]) for piece in pieces},
        }
    first = min((s.start_line for s in post.sections), default=0)
    last = max((s.end_line for s in post.sections), default=0)
    fill = {"model": plain_text(post.model), "path": plain_text(post.source_path), "start": first, "end": last}
    notices = [strings["translation_notice"].format(model=plain_text(translated_by))] if translated_by else []
    if post.model:
        notices.append(strings["explanation_notice"].format(**fill))
    return (
        _templates()
        .get_template("post.md.j2")
        .render(
            front_matter=frontmatter.dump(fields),
            notices=notices,
            intro=intro,
            source_lines=strings["source_lines"].format(**fill) if post.sections else "",
            pieces=pieces,
            demos_heading=strings["demo_output"],
            demos=demos.rstrip("\n"),
            marker=marker if editable else None,
        )
    )


def post_json(post: Post, *, editable: bool = False) -> str:
    """The post as JSON (every field, the ungrounded names included), for scripts and translators.
    editable: with the fingerprints of what was written, as an editable Markdown post has them (here of
    the values themselves), so that an author may edit the JSON instead."""
    data = dataclasses.asdict(post)
    if editable:
        data[WRITTEN_KEY] = {
            "title": fingerprint(post.title),
            "intro": fingerprint(post.intro),
            **{
                piece_id: fingerprint(section.explanation)
                for piece_id, section in zip(piece_ids([s.code for s in post.sections]), post.sections)
            },
        }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
