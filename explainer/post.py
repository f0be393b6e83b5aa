"""What templates render and translators translate: a post as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class Post:
    title: str  # translatable
    lang: str  # human language the prose is written in: en, zh, zh-Hant, ...
    date: str  # YYYY-MM-DD
    source_path: str  # as given by the user, relative where possible
    code_language: str  # programming language of the source: python, c, cpp, cuda
    intro: str = ""  # translatable
    sections: list[Section] = field(default_factory=list)
    backend: str = ""
    model: str = ""
