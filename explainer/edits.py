"""The author's text: edits to an explained post that survive every rebuild, flow into its translations,
and go stale loudly.

An author edits the post that explain wrote (render.render_post(editable=True), or the --format json
data) where they read it. The next run reads that post back (read_published): a part whose text no
longer has the fingerprint its post records is the author's. adopt() keeps it in a small TOML file,
explanations/<slug>.toml beside the config (Edits), keyed by the piece's code hash (post.piece_ids),
before anything is rewritten. apply() then puts the author's text over the model's: published as
written, and translated from it.

When the code under an author's text changes, its key names no piece any more. place() finds the piece
that code became (the most similar code among the pieces no text is keyed by, by difflib), and the text
stays there, marked stale, until the author edits it again or accepts it (explainer review). A post is
reviewed when its title, introduction and every piece hold the author's text, written or accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from explainer import frontmatter
from explainer.errors import UserError
from explainer.fileio import write_atomic
from explainer.markdown_segments import parser, read_markdown, split_document
from explainer.post import Post, piece_ids
from explainer.render import (
    MARKER_CLOSE,
    MARKER_OPEN,
    WRITTEN_KEY,
    display_code,
    fingerprint,
    liquid_safe,
    liquid_unsafe,
    marker,
)

if TYPE_CHECKING:
    from explainer.site_config import SiteConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EDITS_FOLDER = "explanations"  # beside the config (or beside the post explain wrote)
TITLE, INTRO = "title", "intro"  # the parts that are not pieces of code
PIECES = "pieces"  # the marker above the line that names the source, before the first piece
# Code at least this alike (difflib's ratio; 1 is the same code) is still the piece an author's text was
# written for; code less alike is another piece, and a text that fits none waits in the edits file.
MIN_SIMILARITY = 0.5
CODE_BLOCKS = ("fence", "code_block", "liquid_block")  # a Liquid-safe code block is a raw block


# ---------------------------------------------------------------------------------------------
# The edits file
# ---------------------------------------------------------------------------------------------


@dataclass
class AuthorText:
    """What the author wrote (or accepted) for one part of a post."""

    text: str
    code: str = ""  # the code it explains, as the post showed it: a stale piece's diff starts from it
    lines: str = ""  # where that code was in its file, "12-20", for messages


@dataclass
class Edits:
    """explanations/<slug>.toml: the author's text by part, "title", "intro" or a piece id."""

    path: Path
    parts: dict[str, AuthorText] = field(default_factory=dict)


_PIECE_KEYS = {"text", "code", "lines"}


def edits_path(folder: Path, name: str) -> Path:
    """Where the author's text of the post `name` (a slug, or the name of the file explain wrote) is kept."""
    return folder / EDITS_FOLDER / f"{name}.toml"


def load_edits(path: Path) -> Edits:
    """The edits file at `path` (none there: no edits); every mistake in it is one UserError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Edits(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}; fix it (it holds the author's text)") from None
    edits = Edits(path)
    for key, value in data.items():
        if key in (TITLE, INTRO):
            if not isinstance(value, str):
                raise UserError(f"{path}: {key} should be text, like {key} = '...'")
            edits.parts[key] = AuthorText(value)
        elif key == "pieces" and isinstance(value, dict):
            for piece, entry in value.items():
                edits.parts[piece] = _piece_entry(path, piece, entry)
        else:
            raise UserError(f"{path}: unknown key {key!r}; expected title, intro and [pieces.ID] tables")
    return edits


def _piece_entry(path: Path, piece: str, entry: object) -> AuthorText:
    where = f"{path}: [pieces.{piece}]"
    if not isinstance(entry, dict):
        raise UserError(f"{where} should be a table with text = '...'")
    if unknown := sorted(set(entry) - _PIECE_KEYS):
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected text, code and lines")
    if not isinstance(entry.get("text"), str):
        raise UserError(f"{where} needs text = '...': the explanation to publish")
    for key in ("code", "lines"):
        if not isinstance(entry.get(key, ""), str):
            raise UserError(f"{where}: {key} should be text")
    return AuthorText(entry["text"], entry.get("code", ""), entry.get("lines", ""))


def edits_toml(edits: Edits, label: str) -> str:
    """The edits file's text: a header that says what it is, then the title, the introduction and the
    pieces, every string as readable TOML."""
    header = (
        f"# The author's text of {label}: it is published instead of the model's, and translated from it.\n"
        "# Edit it in the post (or here), then build. A piece is keyed by its code's hash; `code` is the\n"
        "# code its text explains, so that a change to it can be shown. Written by explainer build and review."
    )
    blocks = [header]
    if top := [f"{key} = {_toml_string(edits.parts[key].text)}" for key in (TITLE, INTRO) if key in edits.parts]:
        blocks.append("\n".join(top))
    for key, part in edits.parts.items():
        if key not in (TITLE, INTRO):
            table = [f"[pieces.{key}]"]
            table += [f"lines = {_toml_string(part.lines)}"] if part.lines else []
            table += [f"code = {_toml_string(part.code)}"] if part.code else []
            blocks.append("\n".join([*table, f"text = {_toml_string(part.text)}"]))
    return "\n\n".join(blocks) + "\n"


def _toml_string(text: str) -> str:
    """`text` as a TOML string: a literal one, as written, where TOML allows it; else a basic one with
    escapes (JSON's escapes are TOML's, and DEL, which JSON leaves as it is, TOML must have escaped)."""
    multiline = "\n" in text
    controls = any((ord(char) < 0x20 and char not in "\t\n") or ord(char) == 0x7F for char in text)
    if not controls and "'''" not in text and not text.endswith("'"):
        if multiline:
            return f"'''\n{text}'''"  # TOML drops a line break right after the opening quotes
        if "'" not in text:
            return f"'{text}'"
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def save_edits(edits: Edits, label: str, inside: Path | None = None) -> bool:
    """Write the edits file atomically (fileio.write_atomic); True if its bytes changed."""
    try:
        return write_atomic(edits.path, edits_toml(edits, label), inside=inside)
    except OSError as exc:
        raise UserError(f"cannot write {edits.path}: {exc.strerror}; check the folder is writable") from None


# ---------------------------------------------------------------------------------------------
# Pieces, and where the author's text goes
# ---------------------------------------------------------------------------------------------


class _Coded(Protocol):
    """A section of a post, or a chunk it is made from."""

    @property
    def code(self) -> str: ...
    @property
    def start_line(self) -> int: ...
    @property
    def end_line(self) -> int: ...


@dataclass(frozen=True)
class Piece:
    """One piece of code of a post as it is now."""

    id: str
    code: str  # as the post shows it (render.display_code)
    lines: str  # "12-20", or "12"


def pieces_of(chunks: Sequence[_Coded]) -> list[Piece]:
    """The pieces of a post's sections (or of the chunks they are made from), with their ids."""
    return [
        Piece(piece_id, display_code(chunk.code), _line_range(chunk.start_line, chunk.end_line))
        for piece_id, chunk in zip(piece_ids([chunk.code for chunk in chunks]), chunks)
    ]


def _line_range(start: int, end: int) -> str:
    return str(start) if start == end else f"{start}-{end}"


def where(lines: str) -> str:
    """Where a piece is, for messages: "lines 12-20" or "line 12"; "" when not known."""
    return "" if not lines else f"lines {lines}" if "-" in lines else f"line {lines}"


@dataclass
class Placement:
    """Which author's text each piece shows."""

    by_piece: dict[str, str]  # piece id -> key of the author's text it shows (another key: stale)
    unplaced: list[str]  # keys of author's texts that fit no piece: their code is gone

    def is_stale(self, piece: Piece) -> bool:
        return piece.id in self.by_piece and self.by_piece[piece.id] != piece.id


def similarity(before: str, after: str) -> float:
    return difflib.SequenceMatcher(None, before, after, autojunk=False).ratio()


def place(edits: Edits, pieces: list[Piece]) -> Placement:
    """A text keyed by a piece's id is that piece's. A text whose key names no piece (its code changed)
    goes to the piece whose code is most like the code it was written for, among the pieces left, the best
    pair first, if they are at least MIN_SIMILARITY alike."""
    by_piece = {piece.id: piece.id for piece in pieces if piece.id in edits.parts}
    orphans = [key for key in edits.parts if key not in (TITLE, INTRO) and key not in by_piece]
    free = [piece for piece in pieces if piece.id not in by_piece]
    pairs = sorted(
        (
            (-similarity(edits.parts[key].code, piece.code), number, index, key, piece.id)
            for number, key in enumerate(orphans)
            if edits.parts[key].code
            for index, piece in enumerate(free)
        ),
    )
    placed: set[str] = set()
    for negative_score, _number, _index, key, piece_id in pairs:
        if -negative_score >= MIN_SIMILARITY and key not in placed and piece_id not in by_piece:
            by_piece[piece_id] = key
            placed.add(key)
    return Placement(by_piece, [key for key in orphans if key not in placed])


def code_diff(text: AuthorText, piece: Piece) -> str:
    """What changed in the code since the author's text was written, as a unified diff."""
    return "\n".join(
        difflib.unified_diff(
            text.code.splitlines(),
            piece.code.splitlines(),
            fromfile="the code the text was written for",
            tofile=f"the code now, {where(piece.lines)}",
            lineterm="",
        )
    )


# ---------------------------------------------------------------------------------------------
# Reading the author's edits back from a post
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedPart:
    text: str  # as the file holds it, without the white space around it
    code: str = ""  # a piece's code as the file shows it


@dataclass
class Published:
    """An editable post (or its JSON data) as it is on disk: each part's text, and the fingerprints of
    what was written there."""

    path: Path
    markdown: bool  # a Markdown post, whose text is Liquid-safe, or JSON data, whose values are as they are
    written: dict[str, str]
    parts: dict[str, PublishedPart]

    def author_text(self, key: str) -> str:
        """A part's text as the edits file keeps it: what the reader sees, without the Liquid escaping
        that the body of a Markdown post has (its front matter, the title, is YAML)."""
        text = self.parts[key].text
        return liquid_unsafe(text) if self.markdown and key != TITLE else text

    def shown(self, key: str, text: str) -> str:
        """How an author's text for part `key` is written into this file."""
        return liquid_safe(text) if self.markdown and key != TITLE else text


def read_published(path: Path, markdown: bool) -> Published | None:
    """The editable post at `path`, or None where there is none: no file, or a file that records no
    fingerprints (one written before editing was possible, or by hand)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; save it as UTF-8") from None
    return _read_markdown(path, text) if markdown else _read_json(path, text)


def _written(path: Path, value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise UserError(
            f"{path}: {WRITTEN_KEY} is not what explainer wrote there (a mapping of parts to fingerprints); "
            "put it back as it was, so that your edits can be told apart"
        )
    return {str(key): str(fingerprint) for key, fingerprint in value.items()}


def _read_markdown(path: Path, text: str) -> Published | None:
    document = split_document(text)  # the front matter; its source is normalized as markdown-it reads it
    data = frontmatter.read(document, str(path))
    if data is None or WRITTEN_KEY not in data:
        return None
    published = Published(path, True, _written(path, data[WRITTEN_KEY]), {})
    if isinstance(data.get(TITLE), str):
        published.parts[TITLE] = PublishedPart(data[TITLE].strip())
    lines = document.source.splitlines(keepends=True)
    blocks = [t for t in read_markdown(parser(), document.source) if t.level == 0 and t.map is not None]
    markers = [(block, name) for block in blocks if (name := _marker_name(block)) is not None]
    found = {name for _, name in markers}
    for number, (block, name) in enumerate(markers):
        end = markers[number + 1][0].map[0] if number + 1 < len(markers) else len(lines)
        if name == INTRO:
            published.parts[INTRO] = PublishedPart("".join(lines[block.map[1] : end]).strip())
        elif name.startswith("piece "):
            piece = name.removeprefix("piece ")
            code = next((b for b in blocks if block.map[1] <= b.map[0] < end), None)
            if code is None or code.type not in CODE_BLOCKS or piece in published.parts:
                raise UserError(
                    f"{path}: the code block right below `{marker(name)}` is missing, or the marker is there "
                    "twice; put the code block back (it is rewritten by every build), or move the post aside "
                    "to have it written anew"
                )
            published.parts[piece] = PublishedPart("".join(lines[code.map[1] : end]).strip(), _code_in(code))
    missing = [_marker_for(key) for key in published.written if key not in published.parts]
    if PIECES not in found and any(key not in (TITLE, INTRO) for key in published.written):
        # without it, the line that names the source would be read as part of the introduction
        missing.append(PIECES)
    if missing:
        what = "the front matter's title" if missing[0] == TITLE else f"the line `{marker(missing[0])}`"
        raise UserError(
            f"{path}: {what} is missing, so the edits around it cannot be told apart; put it back as it was, "
            "or move the post aside to have it written anew"
        )
    return published


def _marker_name(block) -> str | None:
    content = block.content.strip() if block.type == "html_block" else ""
    if content.startswith(MARKER_OPEN) and content.endswith(MARKER_CLOSE) and "\n" not in content:
        return content[len(MARKER_OPEN) : -len(MARKER_CLOSE)]
    return None


def _marker_for(key: str) -> str:
    return key if key in (TITLE, INTRO) else f"piece {key}"


def _code_in(block) -> str:
    """The code a code block shows; one that liquid_safe wrapped is unwrapped first."""
    if block.type != "liquid_block":
        return block.content.rstrip("\n")
    inner = liquid_unsafe(block.content.rstrip("\n"))
    fences = [t for t in read_markdown(parser(), inner) if t.type == "fence"]
    return fences[0].content.rstrip("\n") if fences else inner


def _read_json(path: Path, text: str) -> Published | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix it, or move it aside to have it written anew"
        ) from None
    if not isinstance(data, dict) or WRITTEN_KEY not in data:
        return None
    published = Published(path, False, _written(path, data[WRITTEN_KEY]), {})
    sections = data.get("sections")
    if (
        not isinstance(sections, list)
        or not all(isinstance(s, dict) and isinstance(s.get("code"), str) for s in sections)
        or not all(isinstance(s.get("explanation"), str) for s in sections)
        or not all(isinstance(data.get(key), str) for key in (TITLE, INTRO))
    ):
        raise UserError(
            f"{path}: the post's data lost its shape (title, intro, and sections with code and explanation, "
            "all text); fix it, or move it aside to have it written anew"
        )
    published.parts[TITLE] = PublishedPart(data[TITLE].strip())
    published.parts[INTRO] = PublishedPart(data[INTRO].strip())
    for piece, section in zip(piece_ids([s["code"] for s in sections]), sections):
        published.parts[piece] = PublishedPart(section["explanation"].strip(), display_code(section["code"]))
    return published


def adopt(edits: Edits, published: Published, pieces: list[Piece]) -> list[str]:
    """Keep in `edits` every part of `published` that its author changed since it was written; returns
    their keys. A part the author changed both in the post and in the edits file is refused: one of the
    two would be lost."""
    current = {piece.id: piece for piece in pieces}
    shows = place(edits, pieces).by_piece
    adopted = []
    for key, part in published.parts.items():
        written = published.written.get(key)
        if written is not None and fingerprint(part.text) == written:
            continue
        source = key if key in edits.parts else shows.get(key)  # the author's text the post showed there
        before = edits.parts.get(source) if source is not None else None
        if before is not None and before.text == published.author_text(key):
            continue  # kept already, by a run stopped before it wrote the post again
        if before is not None and written is not None and fingerprint(published.shown(key, before.text)) != written:
            raise UserError(
                f"{key} was edited both in {published.path} and in {edits.path} since the last build; "
                "undo one of the two edits, then build again"
            )
        if source is not None and source != key:
            del edits.parts[source]  # the author rewrote the stale text: this replaces it
        lines = current[key].lines if key in current else before.lines if before is not None else ""
        edits.parts[key] = AuthorText(published.author_text(key), part.code, lines)
        adopted.append(key)
    return adopted


# ---------------------------------------------------------------------------------------------
# The author's text over the model's
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StalePiece:
    """An author's text kept for a piece whose code changed since it was written."""

    piece: Piece
    key: str  # the author's text's key: the id of the code it was written for
    diff: str

    def line(self, slug: str | None) -> str:
        """One line that says so, and how to settle it: edit the text, or (a site's post, `slug`) accept it."""
        accept = f", or accept it: explainer review {slug} --accept {self.piece.id}" if slug else " to confirm it"
        return (
            f"piece {self.piece.id} ({where(self.piece.lines)}) is stale: its code changed since the author's "
            f"text was written; edit the text in the post{accept}"
        )


@dataclass
class Authored:
    post: Post  # with the author's text in place, reviewed and stale set
    stale: list[StalePiece]
    unplaced: list[str]  # keys of texts whose code is gone, kept in the edits file

    def problems(self, slug: str | None, edits_path: Path) -> list[str]:
        """One line per stale piece and per text that fits no piece (what --strict refuses)."""
        return [stale.line(slug) for stale in self.stale] + self._unplaced_lines(edits_path)

    def warnings(self, slug: str | None, edits_path: Path) -> list[str]:
        """The problems, each stale piece's with the diff of its code below it."""
        return [f"{stale.line(slug)}\n{stale.diff}" for stale in self.stale] + self._unplaced_lines(edits_path)

    def _unplaced_lines(self, edits_path: Path) -> list[str]:
        return [
            f"the author's text [pieces.{key}] of {edits_path} fits no piece now: the code it was written for "
            "is gone; move it to a piece's id there, or delete it"
            for key in self.unplaced
        ]


def apply(post: Post, edits: Edits) -> Authored:
    """The post with the author's text over the model's, and what is stale."""
    pieces = pieces_of(post.sections)
    placement = place(edits, pieces)
    sections = []
    for piece, section in zip(pieces, post.sections):
        key = placement.by_piece.get(piece.id)
        if key is not None:
            section = dataclasses.replace(section, explanation=edits.parts[key].text, authored=True, left_out="")
        sections.append(section)
    stale = [
        StalePiece(piece, placement.by_piece[piece.id], code_diff(edits.parts[placement.by_piece[piece.id]], piece))
        for piece in pieces
        if placement.is_stale(piece)
    ]
    title, intro = edits.parts.get(TITLE), edits.parts.get(INTRO)
    authored = dataclasses.replace(
        post,
        sections=sections,
        title=title.text if title is not None else post.title,
        title_authored=title is not None,
        intro=intro.text if intro is not None else post.intro,
        intro_left_out="" if intro is not None else post.intro_left_out,
        intro_authored=intro is not None,
        reviewed=title is not None
        and intro is not None
        and all(placement.by_piece.get(piece.id) == piece.id for piece in pieces),
        stale=[where(stale.piece.lines) for stale in stale],
    )
    return Authored(authored, stale, placement.unplaced)


def with_author_text(
    post: Post, edits: Edits, published_path: Path, *, markdown: bool, label: str, inside: Path | None = None
) -> Authored:
    """The post as its author wants it: the edits they made in `published_path` since it was written are
    kept in the edits file first (atomically, before the post is written again), then applied."""
    published = read_published(published_path, markdown)
    if published is not None and adopt(edits, published, pieces_of(post.sections)):
        save_edits(edits, label, inside)
    return apply(post, edits)


# ---------------------------------------------------------------------------------------------
# Review
# ---------------------------------------------------------------------------------------------

REVIEWED, NOT_REVIEWED, STALE, NOT_BUILT = "reviewed", "not reviewed", "stale", "not built"


@dataclass(frozen=True)
class ReviewItem:
    name: str  # "title", "intro", or a piece id
    state: str  # REVIEWED, NOT_REVIEWED, STALE or NOT_BUILT
    text: str  # as the post shows it
    piece: Piece | None = None
    diff: str = ""  # a stale piece's code diff

    def describe(self) -> str:
        """The item as `explainer review` lists it: a heading line, then its code or diff, then its text,
        indented."""
        heading = self.name if self.piece is None else f"piece {self.name}, {where(self.piece.lines)}"
        state = {
            STALE: "stale: the code changed since the author's text was written",
            NOT_BUILT: "not in the post yet: run explainer build",
        }.get(self.state, self.state)
        out = [f"{heading} ({state})"]
        if self.piece is not None:
            out += ["  code:" if not self.diff else "  code, changed:"]
            out += [f"    {line}" for line in (self.diff or self.piece.code).splitlines()]
        if self.state != NOT_BUILT:
            out += ["  text:", *(f"    {line}" for line in self.text.splitlines() or [""])]
        return "\n".join(line.rstrip() for line in out)


@dataclass
class Review:
    """One explained post's review: its parts, and accepting them into its edits file."""

    slug: str
    edits: Edits
    published: Published
    pieces: list[Piece]
    inside: Path | None = None

    def items(self) -> list[ReviewItem]:
        placement = place(self.edits, self.pieces)
        items = []
        for name in (TITLE, INTRO):
            if name in self.edits.parts:
                items.append(ReviewItem(name, REVIEWED, self.edits.parts[name].text))
            else:
                items.append(ReviewItem(name, NOT_REVIEWED, self.published.author_text(name)))
        for piece in self.pieces:
            key = placement.by_piece.get(piece.id)
            if key is not None:
                text = self.edits.parts[key]
                if key == piece.id:
                    items.append(ReviewItem(piece.id, REVIEWED, text.text, piece))
                else:
                    items.append(ReviewItem(piece.id, STALE, text.text, piece, code_diff(text, piece)))
            elif piece.id in self.published.parts:
                items.append(ReviewItem(piece.id, NOT_REVIEWED, self.published.author_text(piece.id), piece))
            else:
                items.append(ReviewItem(piece.id, NOT_BUILT, "", piece))
        return items

    def accept(self, names: Iterable[str]) -> list[str]:
        """Accept the named parts as the post shows them ("all": every one not reviewed yet); a stale
        piece's text is accepted for the code as it is now. Returns the names accepted."""
        names = set(names)
        items = self.items()
        if unknown := sorted(names - {item.name for item in items} - {"all"}):
            raise UserError(
                f"post {self.slug!r} has no part {unknown[0]!r}; accept title, intro, a piece's id "
                f"(explainer review {self.slug} lists them) or all"
            )
        chosen = [item for item in items if item.state != REVIEWED and ("all" in names or item.name in names)]
        if not_built := [item.name for item in chosen if item.state == NOT_BUILT and item.name in names]:
            raise UserError(f"piece {not_built[0]} is not in the post yet: run explainer build, then review it")
        placement = place(self.edits, self.pieces)
        accepted = []
        for item in chosen:
            if item.state == NOT_BUILT:
                continue
            if item.state == STALE:
                del self.edits.parts[placement.by_piece[item.name]]
            code, lines = (item.piece.code, item.piece.lines) if item.piece is not None else ("", "")
            self.edits.parts[item.name] = AuthorText(item.text, code, lines)
            accepted.append(item.name)
        if accepted:
            save_edits(self.edits, f"post {self.slug!r}", self.inside)
        return accepted


def open_review(config: SiteConfig, slug: str) -> Review:
    """The review of the explained post `slug` of a site: its pieces
    from the code as it is now, its text from the post last built. Edits made in the post since are kept
    first, as a build keeps them."""
    from explainer.chunking import chunk_file

    slugs = [post.slug for post in config.posts]
    if slug not in slugs:
        raise UserError(f"no post {slug!r} in {config.path.name}; choose from {', '.join(slugs)}")
    spec = config.posts[slugs.index(slug)]
    if spec.file is None:
        raise UserError(f"post {slug!r} is hand-written: its text is its author's already, nothing to review")
    chunked = chunk_file(
        config.root / spec.file, symbol=spec.symbol, max_lines=spec.max_lines, display_path=Path(spec.file).as_posix()
    )
    pieces = pieces_of(chunked.chunks)
    path = config.post_path(spec, config.source_lang)
    published = read_published(path, markdown=True)
    if published is None:
        raise UserError(f"post {slug!r} is not built yet ({path} has no explainer_written); run explainer build")
    edits = load_edits(config.edits_path(spec))
    inside = None if config.trusted else config.path.parent.resolve()
    if adopt(edits, published, pieces):
        save_edits(edits, f"post {slug!r}", inside)
    return Review(slug, edits, published, pieces, inside)
