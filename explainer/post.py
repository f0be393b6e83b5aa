"""What templates render and translators translate: a post as plain data."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

PIECE_ID_LENGTH = 12  # hex digits of a piece's sha256: short enough to type, unique within a post


@dataclass
class Section:
    """One chunk of code and the prose that explains it."""

    code: str  # the chunk, byte for byte as in the source
    code_language: str  # programming language, also the fence's info string: python, c, cpp, cuda
    start_line: int
    end_line: int
    symbol: str  # enclosing symbol, e.g. "Llama.generate"; "" at module level
    kind: str  # chunk kind from chunking.CHUNK_KINDS: signature, block, for, if, return, imports, ...
    explanation: str = ""  # Markdown prose, translatable
    ungrounded: list[str] = field(default_factory=list)  # `identifiers` the explanation invented
    # the model's sentences past the piece's budget, left out of the post (explain.budget_split); in the
    # JSON data only, for an author who wants to read them
    left_out: str = ""
    authored: bool = False  # the explanation is the author's (explainer.edits): published as written


@dataclass
class Post:
    title: str  # translatable
    lang: str  # human language the prose is written in: en, zh, zh-Hant, ...
    date: str  # YYYY-MM-DD
    source_path: str  # as given by the user, relative where possible
    code_language: str  # programming language of the source: python, c, cpp, cuda
    intro: str = ""  # translatable
    intro_left_out: str = ""  # the introduction's sentences past its three (JSON only), as Section.left_out
    sections: list[Section] = field(default_factory=list)
    backend: str = ""
    model: str = ""
    title_authored: bool = False  # the title is the author's: published as written
    intro_authored: bool = False  # the introduction is the author's
    reviewed: bool = False  # every part holds the author's text: written or accepted (explainer review)
    stale: list[str] = field(default_factory=list)  # where an author's text was written for other code


def piece_ids(codes: list[str]) -> list[str]:
    """The id of each piece of a post, given their code in order: the sha256 of its code, as the answer
    cache keys content, cut to PIECE_ID_LENGTH digits. A piece whose code an earlier piece already has
    gets "-2", "-3", ... so that every id names one piece."""
    seen: Counter[str] = Counter()
    ids = []
    for code in codes:
        digest = hashlib.sha256(code.encode("utf-8")).hexdigest()[:PIECE_ID_LENGTH]
        seen[digest] += 1
        ids.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return ids
