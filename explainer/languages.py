"""The languages posts can be written in: names, text direction, UI strings and glossaries.

Each language is one TOML file, explainer/translations/<code>.toml, shipped inside the wheel.
Adding a language means adding a file; nothing else changes.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from importlib import resources

from explainer.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Language:
    code: str  # as in the file name and in URLs: "en", "zh", "zh-Hant", "ar"
    name: str  # in the language itself: "العربية"
    english_name: str  # for prompts: "Arabic"
    dir: str  # "ltr" or "rtl"
    ui: dict[str, str] = field(default_factory=dict)  # strings the templates show
    glossary: dict[str, str] = field(default_factory=dict)  # English term -> how to write it here
    # False where a word never mixes scripts (Hindi writes "GPU का"): a translation with such a word (मODEल,
    # सेट업) is refused. True where one may (Korean's "GPU를", Japanese's "GPUメモリ").
    words_mix_scripts: bool = True
    # False where words are written without spaces between them (Chinese, Japanese): the meaning checks score
    # a read-back into such a language on another scale (translation_checks.round_trip_min_chrf).
    spaced_words: bool = True

    @property
    def detect_code(self) -> str:
        """The code a language detector reports for this language: zh-Hant is detected as zh."""
        return self.code.split("-")[0].lower()


def _translation_files():
    return resources.files("explainer") / "translations"


@functools.cache
def known_languages() -> tuple[str, ...]:
    """Codes of every shipped language file, sorted."""
    return tuple(
        sorted(entry.name[: -len(".toml")] for entry in _translation_files().iterdir() if entry.name.endswith(".toml"))
    )


@functools.cache
def language(code: str) -> Language:
    """The language with this code (case-insensitive: "zh-hant" finds zh-Hant)."""
    by_lower = {known.lower(): known for known in known_languages()}
    canonical = by_lower.get(code.strip().lower())
    if canonical is None:
        raise UserError(
            f"unknown language {code!r}: choose one of {', '.join(known_languages())} "
            f"(or add explainer/translations/{code}.toml)"
        )
    path = _translation_files() / f"{canonical}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"explainer/translations/{canonical}.toml is not valid TOML: {exc}") from None
    glossary = {term: term for term in data.get("glossary", {}).get("keep", [])}
    glossary.update(data.get("glossary", {}).get("terms", {}))
    direction = data.get("dir", "ltr")
    if direction not in ("ltr", "rtl"):
        raise UserError(f"explainer/translations/{canonical}.toml: dir must be ltr or rtl, not {direction!r}")
    flags = {}
    for flag in ("words_mix_scripts", "spaced_words"):
        flags[flag] = data.get(flag, True)
        if not isinstance(flags[flag], bool):
            raise UserError(f"explainer/translations/{canonical}.toml: {flag} must be true or false")
    return Language(
        code=canonical,
        name=data["name"],
        english_name=data["english_name"],
        dir=direction,
        ui=dict(data.get("ui", {})),
        glossary=glossary,
        **flags,
    )
