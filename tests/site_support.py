"""Shared by the site tests: a scripted model that explains and translates, a copy of
examples/site that builds in seconds, and what in a built page could run.

The copy keeps everything of the example (layouts, CSS, _config.yml, the hand-written post, the
explain target) and changes only what needs the real model: the demos run a cheap stand-in that
prints what llama_ref prints, and the backend is an OpenAI-compatible server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from explainer.languages import language

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "site"

# The real demos need the model; these stand-ins print the same kind of output, {{ }} included.
HANDWRITTEN_DEMO = 'python -m llama_ref --prompt "Once upon a time" --max-tokens 32 --seed 0'
STAND_IN_DEMO = (
    "python -c \"print('Once upon a time, a {{ lion }} and a rabbit raced to the river.'); "
    "print('achieved tok/s: 185.527329')\""
)
STAND_IN_OUTPUT = "Once upon a time, a {{ lion }} and a rabbit raced to the river.\nachieved tok/s: 185.527329"
GENERATED_DEMO_OUTPUT = "The capital of France is Paris."
GENERATED_DEMO = f"python -c \"print('{GENERATED_DEMO_OUTPUT}')\""

OVERVIEW = "# How generate() writes text\n\nThis post walks through the function piece by piece."
EXPLANATION = "These lines prepare the values that the next steps of the loop use."

# One word per language that a language detector reads as that language.
TARGET_WORDS = {"zh": "这是翻译的文字", "ar": "هذه ترجمة النص", "ja": "これは翻訳です", "fr": "ceci est traduit"}


def fake_translation(text: str, lang: str) -> str:
    """Every word of `text` replaced by a word of `lang`; placeholders (⟦1⟧), punctuation and names (NVIDIA,
    torch.cuda.OutOfMemoryError: translation_checks.names) kept, as a faithful translation keeps them."""
    from explainer.translation_checks import names

    words = []
    for word in text.split(" "):
        letters = [index for index, char in enumerate(word) if char.isalnum()]
        if "⟦" in word or not letters or names(word):
            words.append(word)
        else:
            words.append(word[: letters[0]] + TARGET_WORDS[lang] + word[letters[-1] + 1 :])
    return " ".join(words)


def is_translation(body: dict) -> bool:
    return body["messages"][0]["content"].startswith("You translate")


def site_script(body: dict) -> str:
    """A model that answers explain requests with fixed prose and translates faithfully."""
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if is_translation(body):
        lang = next(code for code in TARGET_WORDS if f"into {language(code).english_name} " in system)
        return json.dumps(
            {key: fake_translation(text, lang) for key, text in json.loads(user).items()}, ensure_ascii=False
        )
    return OVERVIEW if "Write the opening" in user else EXPLANATION


def make_site(folder: Path, base_url: str, languages: list[str]) -> Path:
    """A copy of examples/site in `folder` whose explainer.toml uses the server at `base_url` and
    cheap demos. Returns the config's path."""
    site = folder / "site"
    shutil.copytree(
        EXAMPLE, site, ignore=shutil.ignore_patterns("_posts", ".explainer-cache", "_site", ".jekyll-cache")
    )
    source = site / "_sources" / "running-llama.md"
    text = source.read_text(encoding="utf-8")
    assert HANDWRITTEN_DEMO in text, "the example post should demo llama_ref"
    source.write_text(text.replace(HANDWRITTEN_DEMO, STAND_IN_DEMO), encoding="utf-8")

    config = tomllib.loads((EXAMPLE / "explainer.toml").read_text(encoding="utf-8"))
    config["site"].update(root=str(REPO), languages=languages)
    config["backend"] = {"name": "openai", "base_url": base_url, "concurrency": 4}
    # every language to the test's server: the example routes Hindi to an API of its own (tests add routes)
    config.pop("languages", None)
    for post in config["posts"]:
        if "demos" in post:
            assert any("python -m llama_ref" in command for command in post["demos"])
            post["demos"] = [GENERATED_DEMO]
    (site / "explainer.toml").write_text(to_toml(config), encoding="utf-8")
    return site / "explainer.toml"


def to_toml(config: dict) -> str:
    """explainer.toml's shape: tables of strings, numbers and lists, and an array of [[posts]].
    JSON strings and arrays are valid TOML values."""
    lines = []
    for name, table in config.items():
        for entry in table if isinstance(table, list) else [table]:
            lines.append(f"[[{name}]]" if isinstance(table, list) else f"[{name}]")
            lines += [f"{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in entry.items()]
            lines.append("")
    return "\n".join(lines)


def run_build(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`explainer build` as a user runs it, in a subprocess: with --trust-config, as the README says to
    build the example, whose root is this repository and whose server the test names in the file."""
    environment = {
        key: value for key, value in os.environ.items() if key not in ("OPENAI_BASE_URL", "EXPLAINER_CACHE_DIR")
    }
    environment["OPENAI_API_KEY"] = "sk-test-not-a-real-key"
    return subprocess.run(
        [sys.executable, "-m", "explainer", "build", "--config", str(config), "--trust-config", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and its mtime in nanoseconds."""
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class LiveParts(HTMLParser):
    """What in a page could run: the elements it has, attributes that run script or style, and
    href or src URLs with a script scheme, read as a browser reads a URL (spaces and controls
    around it, tabs and line breaks inside it, dropped)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: set[str] = set()
        self.live_attributes: list[str] = []
        self.script_urls: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.elements.add(tag)
        for name, value in attrs:
            if name.startswith("on") or name in ("style", "srcdoc"):
                self.live_attributes.append(f"<{tag} {name}>")
            url = "".join(char for char in value or "" if char not in "\t\n\r").strip("".join(map(chr, range(33))))
            if name in ("href", "src") and url.lower().startswith(("javascript:", "vbscript:", "data:")):
                self.script_urls.append(f"<{tag} {name}={value!r}>")
