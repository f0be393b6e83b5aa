"""Constrained decoding: answers whose shape the sampler enforces, token by token.

The translator asks for one JSON object of one-line strings, each holding its markers (⟦1⟧, ⟦2⟧, ...)
exactly once. Small models drop a marker, write it as 【1】 or wrap the object in a code fence now and
then. With a `JsonFields` constraint on a job they cannot: the engine only ever picks tokens that keep
the answer on the shape, and the end-of-turn token only once the object is closed.

How. Every token stands for bytes (Tokenizer.token_bytes), and the shape is a small automaton over
bytes: the fixed JSON between the values ({, keys, colons, commas), then each value's characters, in
which `"` may only end the value once all its markers were written, a marker opener must be followed
by one of the markers still owed and its closer, and no newline, control character or stray closer can
appear. A token is allowed when the automaton accepts all its bytes, so tokens that span a key and the
start of a value, or half a character, work as they do unconstrained.

Checking 150k tokens every step would cost more than the step. So the check is lazy: the sampler's
own pick is checked first (a few microseconds), and only when it breaks the shape is the allowed set
computed, memoised per automaton state, and the pick made again among allowed tokens. For greedy
decoding that is exactly the argmax over allowed tokens. In the common state, inside a value's plain
text, most of the vocabulary is allowed without a check: tokens of whole characters none of which is
special are precomputed once per tokenizer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

_TEXT, _UTF8, _ESCAPE, _HEX, _MARKER = range(5)  # where inside a value the automaton is
_ESCAPABLE = frozenset('"\\/')  # \n, \t etc. would put a control character into a one-line value
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# The most one token can lengthen the shortest way to the end: "\\u" adds four hex digits, the first byte
# of a four-byte character three; with room to spare.
MAX_GROWTH = 8


@dataclass(frozen=True)
class JsonFields:
    """{"key1": "value1", ...} with exactly these keys in this order and nothing around the object;
    markers[i] lists the labels (the "1" of ⟦1⟧) that value i must hold exactly once each. No other
    marker, no newline, no control character and none of `forbidden` can appear in a value. pairs[i] lists (a, b): in
    value i marker a comes before marker b (a link's opening and closing markers)."""

    keys: tuple[str, ...]
    markers: tuple[tuple[str, ...], ...]
    opener: str = "⟦"
    closer: str = "⟧"
    pairs: tuple[tuple[tuple[str, str], ...], ...] = ()  # empty: no order anywhere
    # Characters no value may hold: the brackets of marker look-alikes (【1】, [[1]]) the source has none of,
    # so that a model reaching for one writes the real marker in its place.
    forbidden: str | None = None

    def __post_init__(self):
        if len(self.keys) != len(self.markers) or not self.keys or len(self.pairs) not in (0, len(self.keys)):
            raise ValueError("JsonFields needs at least one key, and one marker list (and pair list) per key")
        for labels in self.markers:
            if any(not label or self.opener in label or self.closer in label or '"' in label for label in labels):
                raise ValueError(f'marker labels must be non-empty and free of {self.opener}, {self.closer} and "')

    def parts(self) -> tuple:
        """The automaton's plan: fixed bytes and values (as frozensets of labels), alternating. The same
        layout as the request the translator sends (json.dumps with indent=0), which models copy."""
        parts: list = []
        for number, (key, labels) in enumerate(zip(self.keys, self.markers)):
            before = "{\n" if number == 0 else '",\n'
            parts += [(before + json.dumps(key, ensure_ascii=False) + ': "').encode(), frozenset(labels)]
        return tuple(parts + [b'"\n}'])


class TokenTable:
    """What the automaton needs to know about a vocabulary, computed once per tokenizer and marker pair."""

    def __init__(
        self, token_bytes, special_ids, stop_ids, vocab_size: int, opener: str, closer: str, forbidden: str = ""
    ):
        specials = set(special_ids)
        self.token_bytes = token_bytes
        self.vocab_size = vocab_size  # the model's logits may have padding rows past the tokenizer
        self.stop_ids = sorted(i for i in stop_ids if 0 <= i < vocab_size)
        self.stops = frozenset(self.stop_ids)
        special_chars = {'"', "\\", opener, closer, *forbidden}
        self.plain: list[int] = []  # whole characters, none special: any value's plain text may hold them
        self.others: list[int] = []  # everything else with bytes: checked one by one when needed
        self.by_first_byte: dict[int, list[int]] = {}
        for token, data in enumerate(token_bytes[:vocab_size]):
            if token in specials or not data:
                continue
            self.by_first_byte.setdefault(data[0], []).append(token)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.others.append(token)
                continue
            if any(ch in special_chars or ch < " " or ch == "\x7f" for ch in text):
                self.others.append(token)
            else:
                self.plain.append(token)


@functools.lru_cache(maxsize=8)
def _table(tokenizer, vocab_size: int, opener: str, closer: str, forbidden: str) -> TokenTable:
    return TokenTable(
        tokenizer.token_bytes, tokenizer.special_ids.values(), tokenizer.stop_ids, vocab_size, opener, closer, forbidden
    )


class JsonFieldsConstraint:
    """One job's automaton over a JsonFields shape (the engine's Job.constraint). allows(token) and
    allowed_ids() never change the state; advance(token) does, once the engine has chosen."""

    def __init__(self, shape: JsonFields, tokenizer, vocab_size: int, max_tokens: int | None = None):
        self.max_tokens = max_tokens  # the job's: the object is closed within it, however the model wanders
        self.forced = False  # the budget ran low and the shortest way to the end was taken, not the model's
        self._forbidden = frozenset(shape.forbidden or "")
        self.table = _table(tokenizer, vocab_size, shape.opener, shape.closer, "".join(sorted(self._forbidden)))
        self._parts = shape.parts()
        # per value part: its markers in their given order, and for each the markers that must come first
        self._order, self._first = {}, {}
        for number, labels in enumerate(shape.markers):
            self._order[2 * number + 1] = labels
            first: dict[str, set] = {}
            for a, b in shape.pairs[number] if shape.pairs else ():
                first.setdefault(b, set()).add(a)
            self._first[2 * number + 1] = {label: frozenset(before) for label, before in first.items()}
        self._opener, self._closer = shape.opener, shape.closer
        # (part, offset) in fixed bytes; (part, owed labels, mode, extra, marker label) in a value; (end,)
        self._state = (0, 0)
        self._strip_space = tokenizer.strips_leading_space  # the first token's leading space is not text
        self._memo: dict[tuple, list[int]] = {}
        self._generated = 0
        # Steered onto an owed marker (a pick tried to end the value without it): until that marker is
        # whole, only the way to it is allowed. Otherwise the model takes the opener's first byte and
        # then wanders off into another character that shares it (⟦ and ⩾ both start with E2).
        self._steering = False

    @property
    def finished(self) -> bool:
        """The object is closed: only an end-of-turn token may follow."""
        return self._state[0] == len(self._parts)

    def allows(self, token: int) -> bool:
        if self.finished:
            return token in self.table.stops
        data = self._bytes(token)
        if data is None:
            return False
        state = self._feed(self._state, data)
        if state is None:
            return False
        if self._steering and not self._shortest_end(self._state).startswith(data):
            return False
        # near the end of the budget, a token must leave room for the shortest way to the closed object
        return not self._tight() or len(self._shortest_end(state)) <= self._left() - 1

    def advance(self, token: int) -> None:
        if not self.finished:
            data = self._bytes(token)
            state = self._feed(self._state, data) if data is not None else None
            if state is None:
                raise ValueError(f"token {token} breaks the answer's shape")
            self.forced = self.forced or self._tight()
            self._state = state
            # the marker is whole once the value is back to plain text (or the object has moved on)
            self._steering = self._steering and len(state) == 5 and (state[2] != _TEXT or state[4] is not None)
        self._strip_space = False
        self._generated += 1

    def allowed_ids(self, rejected: int | None = None) -> list[int]:
        """Every token that keeps the answer on its shape from here (memoised per state). Two cases get
        the tokens on the shortest way to the closed object instead: near the end of the budget, and
        when the `rejected` pick tried to end a value that still owes a marker. A model that wants to
        end a sentence it wrote without its marker then writes the marker, instead of wandering on."""
        if self.finished:
            return self.table.stop_ids
        if rejected is not None and not self._steering and self._ends_owing(rejected):
            self._steering = True
        if self._tight() or self._steering:
            end = self._shortest_end(self._state)
            return [
                t
                for t in self.table.by_first_byte.get(end[0], ())
                if end.startswith(self.table.token_bytes[t]) and self.allows(t)
            ]
        key = (self._state, self._strip_space)
        if key not in self._memo:
            self._memo[key] = self._compute_allowed()
        return self._memo[key]

    @property
    def closing_bytes(self) -> int:
        """How many bytes the shortest way from here to the closed object takes: with a byte-level or
        byte-fallback vocabulary, no more tokens than that. A budget below it cannot hold the shape."""
        return len(self._shortest_end(self._state))

    def _left(self) -> int:
        assert self.max_tokens is not None  # asked only once _tight() found a budget
        return self.max_tokens - self._generated

    def _tight(self) -> bool:
        """Whether the budget is close to what closing the object takes. Each token spells at least one
        byte (byte-level and byte-fallback vocabularies have every byte), and one token can add at most
        MAX_GROWTH bytes to the shortest way out, so until then any token on the shape is safe."""
        return self.max_tokens is not None and self._left() - 1 < len(self._shortest_end(self._state)) + MAX_GROWTH

    def _shortest_end(self, state) -> bytes:
        """The shortest bytes from `state` to the closed object: finish the character or marker at hand,
        write the markers still owed, close the value, and the rest of the object with bare markers."""
        if len(state) == 1:
            return b""
        if len(state) == 2:
            return self._parts[state[0]][state[1] :] + self._rest(state[0] + 1)
        part, owed, mode, extra, label = state
        out = b""
        if label is not None:  # finish the marker at hand
            pending = extra if mode == _UTF8 else b""
            target = min(
                o
                for o in self._ready(part, owed)
                if o.startswith(label) and (o[len(label) :] + self._closer).encode().startswith(pending)
            )
            out, owed = (target[len(label) :] + self._closer).encode()[len(pending) :], owed - {target}
        tail = self._markers(part, owed) + self._rest(part + 1)
        if label is None and mode == _UTF8:
            if tail.startswith(extra):  # half of the next marker's opener: go on with it
                return tail[len(extra) :]
            low = _SECOND_BYTE.get(extra[0], (0x80, 0xBF))[0] if len(extra) == 1 else 0x80
            out = bytes([low]) + b"\x80" * (_utf8_length(extra[0]) - len(extra) - 1)  # some other character
        elif mode == _ESCAPE:
            out = b'"'
        elif mode == _HEX:
            low, high = _hex_range(extra)
            out = f"{next(c for c in range(low, high) if self._escape_allowed(c)):04x}"[len(extra) :].encode()
        return out + tail

    def _markers(self, part: int, owed) -> bytes:
        """The markers `owed` in value `part`, in their given order (which keeps every pair in order)."""
        return b"".join((self._opener + label + self._closer).encode() for label in self._order[part] if label in owed)

    def _ready(self, part: int, owed) -> list[str]:
        """The owed markers that may be written now: none that must come after another still owed."""
        first = self._first[part]
        return [label for label in owed if not first.get(label, frozenset()) & owed]

    def _rest(self, start: int) -> bytes:
        """The parts from `start` on, each value with nothing but its markers."""
        return b"".join(
            piece if isinstance(piece, bytes) else self._markers(index, piece)
            for index, piece in enumerate(self._parts[start:], start)
        )

    # ------------------------------------------------------------------ the automaton

    def _bytes(self, token: int) -> bytes | None:
        table = self.table
        if not 0 <= token < table.vocab_size or token in table.stops:
            return None
        data = table.token_bytes[token] if token < len(table.token_bytes) else b""
        if self._strip_space:
            data = data.removeprefix(b" ")
        return data or None

    def _ends_owing(self, token: int) -> bool:
        """Whether `token` would close the value at hand while it still owes a marker."""
        data, state = self._bytes(token), self._state
        for byte in data or b"":
            following = self._step(state, byte)
            if following is None:
                return byte == ord('"') and len(state) == 5 and state[2] == _TEXT and state[4] is None
            state = following
        return False

    def _compute_allowed(self) -> list[int]:
        table, state = self.table, self._state
        if self._strip_space:  # rare (sentencepiece vocabularies), once per job: check them all
            return [t for t in range(table.vocab_size) if self.allows(t)]
        if len(state) == 5 and state[2] == _TEXT and state[4] is None:
            return table.plain + [t for t in table.others if self._feed(state, table.token_bytes[t]) is not None]
        allowed = []
        for first in range(256):
            if self._step(state, first) is not None:
                allowed += [
                    t for t in table.by_first_byte.get(first, ()) if self._feed(state, table.token_bytes[t]) is not None
                ]
        return allowed

    def _feed(self, state, data: bytes):
        for byte in data:
            state = self._step(state, byte)
            if state is None:
                return None
        return state

    def _step(self, state, byte: int):
        part = state[0]
        if part == len(self._parts):
            return None  # nothing may follow the closed object
        if len(state) == 2:  # fixed bytes
            fixed = self._parts[part]
            if byte != fixed[state[1]]:
                return None
            if state[1] + 1 < len(fixed):
                return (part, state[1] + 1)
            if part + 1 == len(self._parts):
                return (part + 1,)
            return (part + 1, self._parts[part + 1], _TEXT, None, None)
        _, owed, mode, extra, label = state  # label: the marker being read (None outside markers)
        if mode == _TEXT and byte < 0x80:
            return self._char(state, chr(byte))
        if mode == _TEXT or mode == _UTF8:
            # Half a character is allowed only if it can still become an allowed one: no dead ends.
            pending = (extra or b"") + bytes([byte])
            if not _utf8_prefix(pending):
                return None
            if label is not None and not any(char.encode().startswith(pending) for char in self._marker_next(state)):
                return None
            if len(pending) < _utf8_length(pending[0]):
                return (part, owed, _UTF8, pending, label)
            return self._char(state, pending.decode("utf-8"))
        if mode == _ESCAPE:
            char = chr(byte)
            if char == "u":
                return (part, owed, _HEX, "", None)
            return (part, owed, _TEXT, None, None) if char in _ESCAPABLE else None
        # _HEX: the four digits of \uXXXX; the character they spell obeys the rules of a written one
        if chr(byte) not in _HEX_DIGITS:
            return None
        digits = extra + chr(byte)
        if len(digits) < 4:
            # no dead ends: \u000 and \u001 can only become control characters
            _, high = _hex_range(digits)
            return (part, owed, _HEX, digits, None) if high > 0x20 else None
        return (part, owed, _TEXT, None, None) if self._escape_allowed(int(digits, 16)) else None

    def _escape_allowed(self, code: int) -> bool:
        """Whether \\uXXXX with this code may stand in a value: what a written character may be."""
        if 0xD800 <= code <= 0xDFFF:  # half of a surrogate pair (a character past U+FFFF): never a marker
            return True
        char = chr(code)
        return char != self._opener and self._plain_allowed(char)

    def _plain_allowed(self, char: str) -> bool:
        """Whether a character other than a quote, a backslash or the marker opener may stand in a value."""
        return not (char == self._closer or char < " " or char == "\x7f" or char in self._forbidden)

    def _marker_next(self, state) -> set[str]:
        """The characters that may come next in the marker being read."""
        part, owed, _, _, label = state
        return {self._closer if o == label else o[len(label)] for o in self._ready(part, owed) if o.startswith(label)}

    def _char(self, state, char: str):
        """A whole character of a value: plain text, or part of a marker."""
        part, owed, _, _, label = state
        if label is not None:
            ready = self._ready(part, owed)
            if char == self._closer:
                return (part, owed - {label}, _TEXT, None, None) if label in ready else None
            label += char
            return (part, owed, _TEXT, None, label) if any(o.startswith(label) for o in ready) else None
        if char == '"':
            # the value ends only once every marker it owes is written; the next fixed bytes start with "
            return (part + 1, 1) if not owed else None
        if char == "\\":
            return (part, owed, _ESCAPE, None, None)
        if char == self._opener:
            return (part, owed, _TEXT, None, "") if owed else None
        if not self._plain_allowed(char):
            return None
        return state if state[2] == _TEXT else (part, owed, _TEXT, None, None)


def _hex_range(digits: str) -> tuple[int, int]:
    """The codes \\uXXXX can still spell once these first digits are written: [low, high)."""
    shift = 4 * (4 - len(digits))
    low = int(digits, 16) << shift if digits else 0
    return low, low + (1 << shift)


def _utf8_prefix(data: bytes) -> bool:
    """Whether `data` starts a valid UTF-8 character (no overlong form, surrogate or code point past U+10FFFF)."""
    length = _utf8_length(data[0])
    if not length or len(data) > length or any(not 0x80 <= b <= 0xBF for b in data[1:]):
        return False
    if len(data) > 1:
        low, high = _SECOND_BYTE.get(data[0], (0x80, 0xBF))
        return low <= data[1] <= high
    return True


_SECOND_BYTE = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def _utf8_length(lead: int) -> int:
    """How many bytes a UTF-8 character starting with `lead` has; 0 if `lead` cannot start one."""
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0
