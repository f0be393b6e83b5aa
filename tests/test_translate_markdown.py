"""What a translator may see of a Markdown post, and the checks that reject a mangled translation."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin

from explainer.languages import language
from explainer.markdown_segments import split_document
from explainer.translation_checks import segment_problems, structure

DATA = Path(__file__).parent / "data"
SEED = (DATA / "seed_zh.md").read_text(encoding="utf-8")
BROKEN_ARABIC = (DATA / "seed_ar_broken.md").read_text(encoding="utf-8")
REFERENCE = MarkdownIt("commonmark").enable("table").use(front_matter_plugin)


def texts(markdown: str) -> list[str]:
    return [segment.text for segment in split_document(markdown).segments]


def translate_with(markdown: str, translations: dict[str, str]) -> str:
    """Rebuild `markdown` with segments replaced by hand-written translations (by source text)."""
    document = split_document(markdown)
    return document.rebuild(
        {
            index: segment.restore(translations[segment.text])
            for index, segment in enumerate(document.segments)
            if segment.text in translations
        }
    )


# ---------------------------------------------------------------------------------------------
# What is sent: prose only, protected spans as markers
# ---------------------------------------------------------------------------------------------


def test_inline_code_links_urls_html_math_and_liquid_become_markers():
    markdown = (
        'Run `make test`, read [the docs](https://x.org/a_b "Docs") or https://example.com/x_y, '
        "press <kbd>Ctrl</kbd>, see ![plot](p.png), solve $a^2$ and use {{ site.url }} &amp; \\*.\n"
    )
    [segment] = split_document(markdown).segments
    assert segment.text == (
        "Run ⟦1⟧, read ⟦2⟧the docs⟦3⟧ or ⟦4⟧, press ⟦5⟧Ctrl⟦6⟧, see ⟦7⟧, solve ⟦8⟧ and use ⟦9⟧ ⟦10⟧ ⟦11⟧."
    )
    assert segment.protected == (
        "`make test`",
        "[",
        '](https://x.org/a_b "Docs")',
        "https://example.com/x_y",
        "<kbd>",
        "</kbd>",
        "![plot](p.png)",
        "$a^2$",
        "{{ site.url }}",
        "&amp;",
        "\\*",
    )
    assert segment.pairs == ((2, 3),)


def test_a_link_whose_text_is_its_url_is_protected_whole():
    # The seed's links look like this; a model must not get to "translate" the URL in the text.
    assert texts("链接为[https://lzwjava.github.io/computer](https://lzwjava.github.io/computer)。\n") == [
        "链接为⟦1⟧。"
    ]


def test_front_matter_code_html_and_liquid_blocks_are_never_segments():
    markdown = (
        "---\ntitle: Keep me out\n---\n\n```python\nprint('fenced')  # comment\n```\n\n"
        "    indented code line\n\n<div>\nraw html words\n</div>\n\n"
        "{% highlight python %}\nprint('liquid')\n\nmore = 1\n{% endhighlight %}\n\n$$\nE = mc^2\n$$\n\n"
        "Only this sentence is prose.\n"
    )
    assert texts(markdown) == ["Only this sentence is prose."]


def test_headings_list_items_quotes_and_table_cells_are_separate_segments():
    markdown = "## Heading one ##\n\n- item a\n- item b\n\n> quoted\n\n| h1 | h2 |\n|----|----|\n| c1 | c2 |\n"
    assert texts(markdown) == ["Heading one", "item a", "item b", "quoted", "h1", "h2", "c1", "c2"]


def test_the_seed_post_sends_no_code_and_no_urls():
    sent = "\n".join(texts(SEED))
    assert "torchrun" not in sent and "def generate" not in sent and "https://" not in sent
    assert "`" not in sent and "layout" not in sent
    assert "通过 ChatGPT 理解代码" in sent and "ChatGPT帮助翻译。" in sent


# ---------------------------------------------------------------------------------------------
# Putting translations back
# ---------------------------------------------------------------------------------------------


def test_a_wrapped_paragraph_in_a_quote_comes_back_on_one_quoted_line():
    markdown = "> first line\n> second line\n\nafter\n"
    assert texts(markdown) == ["first line second line", "after"]
    assert (
        translate_with(markdown, {"first line second line": "première et seconde"})
        == "> première et seconde\n\nafter\n"
    )


def test_a_hard_break_keeps_its_line_and_quote_marker():
    markdown = "> roses are red  \n> violets are blue\n"
    [segment] = split_document(markdown).segments
    assert segment.text == "roses are red⟦1⟧violets are blue"
    assert translate_with(markdown, {segment.text: "les roses⟦1⟧les violettes"}) == "> les roses  \n> les violettes\n"


def test_untouched_parts_keep_their_bytes():
    markdown = "Intro text here.\n\n*   loose   item\n\n```c\nint  x;\t// tab\n```\n\nEnd text.\n"
    result = translate_with(markdown, {"Intro text here.": "Introducción.", "End text.": "Fin."})
    assert result == "Introducción.\n\n*   loose   item\n\n```c\nint  x;\t// tab\n```\n\nFin.\n"


# ---------------------------------------------------------------------------------------------
# Checks on a whole document: the seed's Arabic copy fails every one of them
# ---------------------------------------------------------------------------------------------


def fence_count(markdown: str) -> int:
    return sum(token.type == "fence" for token in REFERENCE.parse(markdown))


def test_the_broken_arabic_seed_is_rejected():
    problems = structure(SEED).differences(structure(BROKEN_ARABIC))
    assert fence_count(SEED) == 16 and fence_count(BROKEN_ARABIC) == 0
    assert "16 code/verbatim blocks in the source, 0 in the translation" in problems
    assert any(problem.startswith("blockquotes") for problem in problems)
    assert any(problem.startswith("list items") for problem in problems)


def test_a_translated_comment_inside_code_is_rejected():
    comment = "# only replace token if prompt has already been generated"
    assert SEED.count(comment) == 1
    mangled = SEED.replace(comment, "# استبدال الرمز فقط إذا تم إنشاء النص المطلوب بالفعل")
    fences = [token for token in REFERENCE.parse(SEED) if token.type == "fence"]
    [(number, block)] = [(n, token) for n, token in enumerate(fences, 1) if comment in token.content]
    problems = structure(SEED).differences(structure(mangled))
    assert problems == [f"fence {number} (source line {block.map[0] + 1}) is not byte-identical"]


def test_code_duplicated_after_the_arabic_phrase_is_rejected():
    duplicated = SEED.replace(
        "最终，我们可以运行它。",
        "تم ترجمة الكود أعلاه إلى:\n\n```\ninput_ids = input_ids.to(model.device)\n```\n\n最终，我们可以运行它。",
    )
    assert "16 code/verbatim blocks in the source, 17 in the translation" in structure(SEED).differences(
        structure(duplicated)
    )


def test_a_flattened_heading_and_list_are_rejected():
    flattened = SEED.replace("## 运行 LLaMA", "运行 LLaMA").replace("* NVIDIA NCCL，", "NVIDIA NCCL，")
    problems = structure(SEED).differences(structure(flattened))
    assert "headings: 3 in the source, 2 in the translation" in problems
    assert "list items: 13 in the source, 12 in the translation" in problems


# ---------------------------------------------------------------------------------------------
# Checks on one segment
# ---------------------------------------------------------------------------------------------

LINKED = split_document("Read [the guide](https://x.org) and run `make` before the build starts today.\n").segments[0]


@pytest.mark.parametrize(
    "translation, problem",
    [
        ("Lisez ⟦1⟧le guide⟦2⟧ et lancez avant que la compilation commence.", "placeholder ⟦3⟧ is missing"),
        ("Lisez ⟦1⟧le guide⟦2⟧ et ⟦3⟧ ⟦3⟧ avant que la compilation commence.", "placeholder ⟦3⟧ appears 2 times"),
        ("Lisez ⟦1⟧le guide⟦2⟧ et ⟦3⟧ ⟦4⟧ avant que la compilation commence.", "unknown placeholder ⟦4⟧"),
        ("Lisez ⟦2⟧le guide⟦1⟧ et lancez ⟦3⟧ avant que la compilation commence.", "out of order"),
        ("Lisez ⟦1⟧le guide⟦2⟧ et lancez ⟦3 avant que la compilation commence.", "placeholder is broken"),
        ("Lisez ⟦1⟧le guide⟦2⟧ et lancez ⟦3⟧ avant.\n```\nmake\n```", "spans several lines"),
        ("Voici la traduction : ⟦1⟧le guide⟦2⟧ ⟦3⟧ ```markdown", "chatter"),
        ("# Lisez ⟦1⟧le guide⟦2⟧ et lancez ⟦3⟧ avant que la compilation commence.", "headings"),
        ("Lisez ⟦1⟧le guide⟦2⟧ et lancez ⟦3⟧ et `rm -rf` avant que la compilation commence.", "inline code"),
        ("Read ⟦1⟧the guide⟦2⟧ and run ⟦3⟧ before the whole build starts today.", "reads as en, not fr"),
        # the markers dropped from the sentence and heaped at its end (Qwen2.5-Coder-1.5B, steered to them)
        ("Lisez le guide et lancez la commande avant que la compilation commence ⟦1⟧⟦2⟧⟦3⟧.", "side by side"),
    ],
)
def test_segment_problems(translation, problem):
    problems = segment_problems(LINKED, translation, language("fr"), source_lang="en")
    assert any(problem in found for found in problems), problems


def test_a_good_segment_translation_passes():
    assert (
        segment_problems(
            LINKED,
            "Lisez ⟦1⟧le guide⟦2⟧ et lancez ⟦3⟧ avant que la compilation ne commence.",
            language("fr"),
            source_lang="en",
        )
        == []
    )


@pytest.mark.parametrize("word", ["मODEल", "सेट업", "लог"])
def test_a_hindi_word_that_mixes_scripts_is_refused_and_a_latin_word_of_its_own_is_not(word):
    # what Qwen2.5-Coder-1.5B wrote for the example site (Latin, Hangul and Cyrillic letters inside Devanagari
    # words); Hindi writes "GPU का"
    broken = f"आज बिल्ड शुरू होने से पहले ⟦1⟧{word} गाइड⟦2⟧ पढ़ें और ⟦3⟧ चलाएँ।"
    good = "आज बिल्ड शुरू होने से पहले GPU का ⟦1⟧गाइड⟦2⟧ पढ़ें और ⟦3⟧ चलाएँ।"
    hindi = language("hi")
    assert any(
        f"a word mixes scripts ('{word}')" in problem
        for problem in segment_problems(LINKED, broken, hindi, source_lang="en")
    )
    assert segment_problems(LINKED, good, hindi, source_lang="en") == []
    # Korean attaches particles to Latin words ("GPU를"): its language file allows such words
    assert not any(
        "mixes scripts" in problem
        for problem in segment_problems(
            LINKED,
            "오늘 빌드가 시작되기 전에 ⟦1⟧가이드⟦2⟧를 읽고 GPU를 쓰는 ⟦3⟧을 실행하세요.",
            language("ko"),
            source_lang="en",
        )
    )


@pytest.mark.parametrize("word", ["التmplتة", "مismatchة"])
def test_an_arabic_word_that_mixes_scripts_is_refused_and_a_name_joined_by_a_tatweel_is_not(word):
    # what Qwen2.5-Coder-1.5B wrote for the example site's hand-written post; Arabic writes "GPU" or "الـGPU"
    broken = f"اقرأ ⟦1⟧الدليل⟦2⟧ عن {word} وشغّل ⟦3⟧ قبل أن يبدأ البناء."
    good = "اقرأ ⟦1⟧الدليل⟦2⟧ عن الـGPU وشغّل ⟦3⟧ قبل أن يبدأ البناء."
    arabic = language("ar")
    assert any(
        f"a word mixes scripts ('{word}')" in problem
        for problem in segment_problems(LINKED, broken, arabic, source_lang="en")
    )
    assert not any("mixes scripts" in problem for problem in segment_problems(LINKED, good, arabic, source_lang="en"))


def test_a_pipe_in_a_table_cell_is_rejected():
    cell = split_document("| Column |\n|---|\n| the value of the setting |\n").segments[1]
    assert "a '|' in a table cell would split the cell" in segment_problems(
        cell, "la valeur | du réglage", language("fr"), source_lang="en"
    )


def test_a_quote_already_in_another_language_may_stay_in_it():
    quote = split_document("> RuntimeError: Distributed package doesn't have NCCL built in\n").segments[0]
    assert segment_problems(quote, quote.text, language("ar"), source_lang="zh") == []


def test_short_or_mostly_protected_segments_are_not_judged_by_language():
    short = split_document("NVIDIA NCCL，[https://developer.nvidia.com/nccl](https://developer.nvidia.com/nccl)\n")
    [segment] = short.segments
    assert segment_problems(segment, "NVIDIA NCCL، ⟦1⟧", language("ar"), source_lang="zh") == []


def test_prose_that_cannot_be_located_is_left_alone_and_reported():
    # markdown-it unescapes "\|" in a cell, so the cell's text is not in the source as it is.
    document = split_document("| a |\n|---|\n| x \\| y |\n")
    assert [segment.text for segment in document.segments] == ["a"]
    assert document.unmapped_lines == [3]


# ---------------------------------------------------------------------------------------------
# Markup is counted per segment: none added, none dropped
# ---------------------------------------------------------------------------------------------

[MARKED] = split_document("Read **the guide** and [the notes](https://x.org) before the build starts today.\n").segments
GOOD_MARKED = "Lisez **le guide** et ⟦1⟧les notes⟦2⟧ avant que la compilation commence aujourd'hui."


@pytest.mark.parametrize(
    "translation, problem",
    [
        (GOOD_MARKED.replace("**le guide**", "le guide"), "strong emphasis (**): 1 in the source, 0"),
        (GOOD_MARKED.replace("compilation", "**compilation**"), "strong emphasis (**): 1 in the source, 2"),
        (GOOD_MARKED.replace("compilation", "*compilation*"), "em emphasis (*): 0 in the source, 1"),
        (GOOD_MARKED.replace("compilation", "~~compilation~~"), "s emphasis (~~): 0 in the source, 1"),
        (GOOD_MARKED.replace("compilation", "`compilation`"), "inline code"),
        (GOOD_MARKED.replace("compilation", "[compilation](https://evil.example)"), "links: 1 in the source, 2"),
        (GOOD_MARKED.replace("compilation", "![compilation](x.png)"), "images: 0 in the source, 1"),
        (GOOD_MARKED.replace("compilation", "<b>compilation</b>"), "HTML or Liquid differs"),
        ("## " + GOOD_MARKED, "headings: 0 in the source, 1"),
        (GOOD_MARKED.replace(".", " ?"), "a question the source does not ask"),
    ],
)
def test_a_segment_may_neither_add_nor_drop_markup(translation, problem):
    """Counted per segment: a bold span moved from one segment to the next would pass a count over the post."""
    problems = segment_problems(MARKED, translation, language("fr"), source_lang="en")
    assert any(problem in found for found in problems), problems
    assert segment_problems(MARKED, GOOD_MARKED, language("fr"), source_lang="en") == []


def test_emphasis_moved_between_segments_is_caught_though_the_post_keeps_its_count():
    first, second = split_document("Run **it** now please.\n\nThen stop and wait here.\n").segments
    assert segment_problems(first, "Lancez-le maintenant.", language("fr"), "en")
    assert segment_problems(second, "Puis **arrêtez** et attendez ici.", language("fr"), "en")


@pytest.mark.parametrize(
    "source, translation, repaired",
    [
        # what Qwen2.5-Coder-1.5B wrote: the source has no bold and no '*', so each '*' was added
        (
            "The sampler below shows where `temperature` enters.",
            "下面的采样器展示了 **1** 入口的位置 ⟦1⟧。",
            "下面的采样器展示了 1 入口的位置 ⟦1⟧。",
        ),
        ("Keep the value below one.", "Gardez la valeur _sous_ un.", "Gardez la valeur sous un."),
        # the source has bold of its own: which bold was added is a guess, so it is asked again instead
        ("Keep **the value** below one.", "Gardez **la valeur** **sous** un.", None),
        # the source has a '_' (in top_p): removing every '_' would change that word too
        ("Keep top_p below one.", "Gardez top_p *sous* un.", "Gardez top_p sous un."),
        ("Keep top_p below one.", "Gardez top_p _sous_ un.", None),
        # emphasis dropped: nothing to strip
        ("Keep **the value** below one.", "Gardez la valeur sous un.", None),
    ],
)
def test_added_emphasis_is_stripped_only_when_that_is_unambiguous(source, translation, repaired):
    from explainer.translation_checks import repair_emphasis

    [segment] = split_document(source + "\n").segments
    assert repair_emphasis(segment, translation) == (repaired or translation)
    if repaired:
        assert not any("emphasis" in problem for problem in segment_problems(segment, repaired, language("fr"), "en"))
