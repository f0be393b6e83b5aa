"""A post's front matter, the YAML between the two `---` lines: read, changed and written back in one place.

Reading is a ruamel.yaml round trip, so key order, comments and each value's quoting survive a
change; writing quotes whatever would otherwise read back as another type or break the syntax
(`: `, `#`, `yes`, `1.0`) and never folds a long title over two lines. render writes a generated
post's front matter, translate and site change a hand-written one's.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from explainer.errors import UserError
from explainer.markdown_segments import Document, split_document


def _yaml() -> YAML:
    yaml = YAML()  # round trip
    yaml.preserve_quotes = True
    yaml.allow_unicode = True
    yaml.width = 1 << 20  # never fold a long title onto two lines
    return yaml


def dump(fields: Mapping[str, object]) -> str:
    """The YAML text of `fields`, keys in their order (without the `---` lines)."""
    stream = io.StringIO()
    _yaml().dump(fields if isinstance(fields, CommentedMap) else dict(fields), stream)
    return stream.getvalue()


def read(document: Document, name: str) -> CommentedMap | None:
    """The document's front matter as a round-trip mapping; None if it has none. `name` is how errors
    name the file."""
    if document.front_matter is None:
        return None
    try:
        data = _yaml().load(document.front_matter.yaml)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""  # +2: the --- line, 1-based
        raise UserError(
            f"{name}: the front matter is not valid YAML{where}: "
            f"{getattr(exc, 'problem', None) or exc}; fix it and retry"
        ) from None
    if data is None:
        return CommentedMap()
    if not isinstance(data, CommentedMap):
        raise UserError(f"{name}: the front matter is not a mapping of keys to values; fix it and retry")
    return data


def body(document: Document, text: str | None = None) -> str:
    """What follows the front matter: of `text` (a copy of the document's source whose front matter
    range is unchanged, such as its translation), by default of the document itself."""
    source = document.source if text is None else text
    return source[document.front_matter.end if document.front_matter else 0 :]


def join(fields: Mapping[str, object], rest: str) -> str:
    """A post of front matter `fields` followed by `rest`."""
    return f"---\n{dump(fields)}---\n{rest}"


def update(text: str, name: str, values: Mapping[str, object], defaults: Mapping[str, object] = {}) -> str:
    """`text` with `values` set in its front matter and `defaults` added where missing; the other keys
    keep their order, values and quoting. A post without front matter gets one."""
    document = split_document(text)
    data = read(document, name)
    data = CommentedMap() if data is None else data
    for key, value in defaults.items():
        data.setdefault(key, value)
    data.update(values)
    return join(data, body(document))
