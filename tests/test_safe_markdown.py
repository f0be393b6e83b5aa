"""What a model writes is published with its raw HTML escaped and its Markdown intact, as kramdown
(Jekyll's converter, run here through Ruby as Jekyll runs it) reads it."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import unicodedata
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt
from site_support import LiveParts

from explainer.safe_markdown import escape_model_html, plain_text

# A model's explanation as models write them: every kind of formatting a post uses.
FORMATTED = """\
The loop keeps `i < n` true and stops at `tokens[i] == eos`. **Note:** the cache is *per layer*.

1. First, `prev_pos` starts at `0`.
2. Then the model runs on `tokens[:, prev_pos:cur_pos]`:

```python
if min_prompt_len < total_len:
    logits = self.model.forward(tokens, prev_pos)  # <B, V>
```

| Name | Meaning |
|------|---------|
| `bsz` | batch size, `< 64` |

> Sampling with `temperature > 0` uses `sample_top_p`.

See [the paper](https://arxiv.org/abs/2302.13971 "LLaMA: open models") or <https://pytorch.org>,
a dict like {"a": 1}, and \\<not a tag\\>.
"""
# Prose that changes, but reads the same on the page.
PLAIN_SIGNS = "If a < b && c, the data: field holds {:x} &#8212; see ~~old~~ notes."


def test_markdown_formatting_code_spans_and_fences_stay_byte_for_byte():
    assert escape_model_html(FORMATTED) == FORMATTED
    assert (
        escape_model_html(PLAIN_SIGNS) == "If a &lt; b && c, the data\\: field holds \\{:x} &#8212; see ~~old~~ notes."
    )


@pytest.mark.parametrize(
    "html, escaped",
    [
        ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("<img src=x onerror=alert(1)>", "&lt;img src=x onerror=alert(1)&gt;"),
        (
            'Hi <a href="?a=1&amp;b=2" onclick="go()">there</a>!',
            'Hi &lt;a href="?a=1&amp;amp;b=2" onclick="go()"&gt;there&lt;/a&gt;!',
        ),
        ("<div>\n**still HTML**\n</div>", "&lt;div&gt;\n**still HTML**\n&lt;/div&gt;"),
        ("> <details ontoggle=alert(1)>\n> x", "> &lt;details ontoggle=alert(1)&gt;\n> x"),  # the quote stays a quote
    ],
)
def test_raw_html_is_escaped(html, escaped):
    assert escape_model_html(html) == escaped


@pytest.mark.parametrize(
    "markdown, inert",
    [
        ("[click](javascript:alert(1))", "[click](javascript\\:alert(1))"),
        ("![x](data:text/html,<b>)", "![x](data\\:text/html,&lt;b&gt;)"),
        (
            "[a](java&#115;cript:alert(1)) [b](javascript&colon;x)",
            "[a](java&amp;#115;cript:alert(1)) [b](javascript&amp;colon;x)",
        ),
        ("[r]\n\n[r]: JavaScript:alert(1)", "[r]\n\n[r]: JavaScript\\:alert(1)"),
        ('para\n{: onmouseover="alert(1)"}', 'para\n\\{: onmouseover="alert(1)"}'),  # a kramdown attribute list
        ('$<b onclick="x">$', '$&lt;b onclick="x">$'),  # math to markdown-it, a tag to kramdown
    ],
)
def test_what_only_kramdown_makes_live_is_made_inert(markdown, inert):
    assert escape_model_html(markdown) == inert


def test_code_kramdown_may_read_otherwise_is_escaped_or_written_as_html():
    # kramdown opens no fence here: `<b>` would be live on the page
    assert escape_model_html("```\n<b onclick=1>") == "<pre><code>&lt;b onclick=1&gt;</code></pre>"
    # a fence in a list item shows the same code as a <pre> block (kramdown nests lists its own way)
    assert (
        escape_model_html("1. Then:\n   ```c\n   #include <stdio.h>\n   ```\n")
        == '1. Then:\n   <pre><code class="language-c">#include &lt;stdio.h&gt;\n   </code></pre>\n'
    )
    # a stray backtick before a code span may pair with it to kramdown
    assert escape_model_html("a ` b `<i>`") == "a ` b `&lt;i&gt;`"


# ---------------------------------------------------------------------------------------------
# kramdown itself: no live HTML in what it makes of hostile text, the same HTML for benign text
# ---------------------------------------------------------------------------------------------

KRAMDOWN = """
require 'json'
require 'kramdown'
require 'kramdown-parser-gfm'
documents = JSON.parse(STDIN.read)
puts JSON.generate(documents.map { |text| Kramdown::Document.new(text, input: 'GFM', hard_wrap: false).to_html })
"""
# examples/site/_config.yml: kramdown with GFM input, no hard wraps.


def kramdown(documents: list[str]) -> list[str]:
    if shutil.which("ruby") is None:
        pytest.skip("needs Jekyll's kramdown: apt-get install jekyll (.ci/run installs it)")
    result = subprocess.run(
        ["ruby", "-e", KRAMDOWN], input=json.dumps(documents), capture_output=True, text=True, timeout=300, check=False
    )
    if "cannot load such file" in result.stderr:
        pytest.skip("needs Jekyll's kramdown: apt-get install jekyll (.ci/run installs it)")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# What kramdown makes of Markdown; any other element on the page came from raw HTML.
MARKDOWN_ELEMENTS = frozenset(
    {
        "p",
        "a",
        "img",
        "em",
        "strong",
        "code",
        "pre",
        "ul",
        "ol",
        "li",
        "blockquote",
        "hr",
        "br",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "del",
        "div",
        "span",
        "dl",
        "dt",
        "dd",
        "abbr",
        "sup",
    }
)


def live(html: str) -> list[str]:
    parts = LiveParts(html)
    return sorted(parts.elements - MARKDOWN_ELEMENTS) + parts.live_attributes + parts.script_urls


# Pieces of hostile Markdown: HTML, script links, and what markdown-it and kramdown read differently
# (fences in lists and quotes, lazy lines, backtick runs, `~~`, `$$`, attribute lists, entities).
ATOMS = list("<>&{}:`~*_[]()!\\|-$ \n\n\n\t\"'") + [
    "```",
    "~~~",
    "```py\n",
    "\n```\n",
    "\n    ",
    "\n\t",
    "\n> ",
    "\n- ",
    "\n1. ",
    "\n  ",
    "\n   ",
    " \t",
    '<b onclick="x">',
    '<img src="x" onerror="y">',
    "<div>",
    "</div>",
    "<!--",
    "-->",
    "<pre>",
    "</pre>",
    "<script>",
    "</script>",
    "javascript:",
    "java\nscript:",
    "&#58;",
    "&#x6a;",
    "&Tab;",
    "{:",
    "{::nomarkdown}",
    "{:/}",
    "[a](",
    "](",
    "[r]: ",
    "[r]",
    "$$",
    "`",
    "``",
    "a",
    "b ",
    "|",
    "\n|---|\n",
    "~~",
    "***",
    "\n---\n",
    "\n===\n",
    "#",
]


def hostile_documents(count: int, seed: int) -> list[str]:
    chance = random.Random(seed)
    return ["".join(chance.choice(ATOMS) for _ in range(chance.randint(1, 60))) for _ in range(count)]


@pytest.mark.slow  # a sweep or subprocesses that load a model: make test, not test-fast
def test_kramdown_makes_nothing_live_of_hostile_text():
    documents = hostile_documents(2000, seed=7)
    raw = kramdown([text + "\n" for text in documents])
    assert sum(bool(live(html)) for html in raw) > 1000  # the generator really is hostile
    escaped = kramdown([escape_model_html(text) + "\n" for text in documents])
    assert [(text, live(html)) for text, html in zip(documents, escaped) if live(html)] == []


def test_kramdown_renders_benign_text_as_before():
    [formatted, before, after] = kramdown([FORMATTED, PLAIN_SIGNS, escape_model_html(PLAIN_SIGNS)])
    assert "<strong>Note:</strong>" in formatted and "<code>i &lt; n</code>" in formatted
    assert before == after


def shown_as(html: str) -> tuple[set[str], str]:
    """The elements of rendered HTML, and its text as a reader sees it."""

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.elements, self.text = set(), ""

        def handle_starttag(self, tag, attrs):
            self.elements.add(tag)

        def handle_data(self, data):
            self.text += data

    page = Text()
    page.feed(html)
    return page.elements, page.text.strip()


NAMES = [
    "x<img src=x onerror=alert(7)>.py",
    "gpt<svg onload=alert(8)>",
    "[z](javascript:alert(9))",
    "a*b*c_.py",
    "_private.py",
    "llama_ref/generation.py",
    "# heading",
    "1. first",
    "- item",
    "x\n# y",
    "`code`",
    "a~~b~~",
    "{:.x onclick=y}",
    "$$x$$",
    "java&#115;cript:x",
    "a | b",
    "![i](x)",
    "<https://x>",
    "\\*",
    ": defined",
    "^",
]


def caption(name: str) -> str:
    # where names land: a caption in emphasis, and at the start of a notice line
    return f"*{plain_text(name)}, lines 1–4*\n\n{plain_text(name)} explained this code.\n"


def test_a_name_shows_as_written_in_commonmark_with_no_element_of_its_own():
    for name in NAMES + hostile_documents(300, seed=11):
        shown = "".join(" " if unicodedata.category(char) == "Cc" else char for char in name).strip()
        elements, text = shown_as(MarkdownIt("commonmark", {"html": True}).render(caption(name)))
        assert elements <= {"p", "em"}, (name, elements)
        assert text.split("\n") == [f"{shown}, lines 1–4", f"{shown} explained this code."], name


def test_kramdown_shows_a_name_as_written_with_no_element_of_its_own():
    names = NAMES + hostile_documents(300, seed=11)
    for name, html in zip(names, kramdown([caption(name) for name in names])):
        elements, text = shown_as(html)
        assert elements <= {"p", "em"} and not live(html), (name, html)
