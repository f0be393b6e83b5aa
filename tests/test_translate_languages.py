"""Language files: every language a post can be written in, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

import pytest

from explainer.errors import UserError
from explainer.languages import known_languages, language
from explainer.translation_checks import detect_lang

SEED = (Path(__file__).parent / "data" / "seed_zh.md").read_text(encoding="utf-8")


def test_the_required_languages_ship():
    assert {"en", "zh", "zh-Hant", "ja", "ko", "es", "fr", "de", "ar", "hi"} <= set(known_languages())


@pytest.mark.parametrize("code", known_languages())
def test_each_language_is_complete(code):
    lang, english = language(code), language("en")
    assert lang.code == code and lang.name and lang.english_name
    assert lang.dir == ("rtl" if code == "ar" else "ltr")
    assert set(lang.ui) == set(english.ui)  # a template may use any of them in any language
    for text in lang.ui.values():
        text.format(model="ChatGPT", path="llama/generation.py", start=1, end=9)
    assert set(lang.glossary) == set(english.glossary)
    assert lang.glossary["top_p"] == "top_p" and lang.glossary["logits"] == "logits"


def test_the_chinese_translation_notice_is_the_one_the_seed_opens_with():
    notice = language("zh").ui["translation_notice"].format(model="ChatGPT")
    assert notice == "ChatGPT帮助翻译。"
    first_line_after_front_matter = SEED.split("\n---\n", 1)[1].strip().splitlines()[0]
    assert first_line_after_front_matter == notice


def test_codes_are_case_insensitive():
    assert language("ZH-hant").code == "zh-Hant"
    assert language(" AR ").dir == "rtl"


def test_an_unknown_code_names_the_known_ones():
    with pytest.raises(UserError) as error:
        language("klingon")
    message = str(error.value)
    assert "unknown language 'klingon'" in message and "zh-Hant" in message and "\n" not in message


def test_detect_lang_answers_with_a_human_language_a_post_can_be_written_in():
    assert detect_lang("Each piece of the function is explained in a few sentences below it.") == "en"
    assert detect_lang("下面用几句话解释这个函数的每一部分。") == "zh"
    # Even code is given the human language it reads most like, never a programming language.
    assert detect_lang("def scale(x):\n    return x * 2\n") in {
        language(code).detect_code for code in known_languages()
    }
