"""Small text utilities."""

import unicodedata


def edit_distance(a, b):
    """How many single-character edits turn string `a` into string `b`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            cost = 0 if char_a == char_b else 1
            current.append(min(previous[j] + 1,          # char_a removed
                               current[j - 1] + 1,       # char_b added
                               previous[j - 1] + cost))  # char_a changed into char_b
        previous = current
    return previous[-1]


def slugify(title, max_length=60):
    """A URL-friendly version of `title`: "Héllo, World!" -> "hello-world"."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    pieces = []
    word = []
    for char in ascii_text.lower():
        if char.isalnum():
            word.append(char)
        elif word:
            pieces.append("".join(word))
            word = []
    if word:
        pieces.append("".join(word))
    return "-".join(pieces)[:max_length].rstrip("-")


def parse_settings(text):
    """Read `key = value` lines into a dict; `#` starts a comment."""
    settings = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number}: expected key = value, got {line!r}")
        settings[key.strip()] = value.strip()
    return settings
