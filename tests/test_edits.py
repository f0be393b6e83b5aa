"""The author stays in charge of an explained post: edits made in it survive every rebuild byte for byte,
are translated from, go stale loudly when their code changes, and `explainer review` accepts the rest.

A small site explains one function of its own folder through the real openai SDK and a scripted server
on 127.0.0.1; posts are read back with markdown-it-py and ruamel, the edits file with tomllib."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin
from ruamel.yaml import YAML
from scripted_server import interrupt_when, user_text
from site_support import fake_translation, is_translation, run_build, site_script, to_toml, tomllib
from test_explain import first_code_line, last_fence

from explainer.chunking import chunk_file
from explainer.cli import main
from explainer.edits import AuthorText, Edits, Piece, edits_toml, load_edits, place
from explainer.errors import UserError

LANGUAGES = ["en", "zh"]
SAMPLE = """\
def pick(scores, temperature=1.0):
    probs = [s / temperature for s in scores]
    best = 0

    for index, p in enumerate(probs):
        if p > probs[best]:
            best = index

    return best
"""
TITLE = "Picking the best score"
INTRO = "This post walks through `pick`."
SCALE, LOOP = "probs = [s / temperature for s in scores]", "for index, p in enumerate(probs):"
# What the author writes over the model's explanations of two pieces: a paragraph becomes two, with
# formatting; and one sentence.
EDIT_SCALE = "Scales each score by the temperature: a **low** one sharpens it.\n\nIt starts from the first score."
EDIT_LOOP = "Walks the scores once and keeps the index of the best one so far in `best`."
LOOP_SEGMENT = EDIT_LOOP.replace("`best`", "⟦1⟧")  # what a translator gets of it: code held by a marker
PARSER = MarkdownIt("commonmark").use(front_matter_plugin)


def explanation(first_line: str) -> str:
    return f"This runs `{first_line}`."


def script(body: dict) -> str:
    """A model that explains each piece by naming its first line, and translates faithfully."""
    if is_translation(body):
        return site_script(body)
    prompt = user_text(body)
    if "Write the opening" in prompt:
        return f"# {TITLE}\n\n{INTRO}"
    return explanation(first_code_line(last_fence(prompt)))


@pytest.fixture
def server(scripted_server):
    return scripted_server(script)


@pytest.fixture
def config(tmp_path, server, openai_env):
    """A site of one explained post, `sampler`: pick() of code/sampler.py, in four pieces."""
    site = tmp_path / "site"
    (site / "code").mkdir(parents=True)
    (site / "code" / "sampler.py").write_text(SAMPLE, encoding="utf-8")
    settings_ = {
        "site": {"root": ".", "languages": LANGUAGES},
        "backend": {"name": "openai", "base_url": server.base_url, "concurrency": 4},
        "posts": [
            {"slug": "sampler", "date": "2024-05-01", "file": "code/sampler.py", "symbol": "pick", "max_lines": 4}
        ],
    }
    (site / "explainer.toml").write_text(to_toml(settings_), encoding="utf-8")
    return site / "explainer.toml"


def places(config) -> dict[str, str]:
    """Where each piece of pick() is, by its code's first line, as chunking splits it: "lines 5-8"."""
    chunks = chunk_file(config.parent / "code" / "sampler.py", "pick", max_lines=4).chunks
    return {
        first_code_line(c.code): f"line {c.start_line}"
        if c.start_line == c.end_line
        else f"lines {c.start_line}-{c.end_line}"
        for c in chunks
    }


def post_path(config, lang: str = "en"):
    return config.parent / "_posts" / lang / f"2024-05-01-sampler-{lang}.md"


def read_post(config, lang: str = "en") -> str:
    return post_path(config, lang).read_text(encoding="utf-8")


def body(post: str) -> str:
    return post.split("---\n", 2)[2]


def front_matter(post: str) -> dict:
    [token] = [token for token in PARSER.parse(post) if token.type == "front_matter"]
    return YAML(typ="safe").load(token.content)


def edit_post(config, old: str, new: str) -> None:
    """What an author does in an editor: replace text of the English post."""
    text = read_post(config)
    assert text.count(old) == 1, old
    post_path(config).write_text(text.replace(old, new), encoding="utf-8")


def edits_file(config) -> dict:
    return tomllib.loads((config.parent / "explanations" / "sampler.toml").read_text(encoding="utf-8"))


def build(config, *args: str):
    result = run_build(config, *args)
    assert result.returncode == 0, result.stderr
    return result


def segments_sent(requests: list[dict]) -> list[str]:
    return [text for body in requests for text in json.loads(user_text(body)).values()]


def translated_loop_edit() -> str:
    return fake_translation(LOOP_SEGMENT, "zh").replace("⟦1⟧", "`best`")


def test_edits_survive_byte_for_byte_and_the_translation_is_made_from_them(config, server):
    build(config)
    edit_post(config, explanation(SCALE), EDIT_SCALE)
    edit_post(config, explanation(LOOP), EDIT_LOOP)
    edited = read_post(config)
    sent = len(server.requests)

    result = build(config)

    assert body(read_post(config)) == body(edited)  # both edits, and all else, byte for byte
    new = server.requests[sent:]
    assert new and all(is_translation(request) for request in new)  # no explain request: answers are cached
    # only what changed, code spans held by markers as ever
    assert sorted(segments_sent(new)) == sorted([*EDIT_SCALE.split("\n\n"), LOOP_SEGMENT])
    chinese = read_post(config, "zh")
    for paragraph in EDIT_SCALE.split("\n\n"):
        assert fake_translation(paragraph, "zh") in chinese
    assert translated_loop_edit() in chinese
    assert explanation(SCALE) not in chinese and fake_translation(explanation(SCALE), "zh") not in chinese
    pieces = edits_file(config)["pieces"]
    assert sorted(piece["text"] for piece in pieces.values()) == sorted([EDIT_SCALE, EDIT_LOOP])
    assert any(piece["code"].startswith(SCALE) for piece in pieces.values())
    assert "_posts/en/2024-05-01-sampler-en.md" in result.stdout  # its fingerprints were brought up to date

    again = build(config)  # nothing left to do
    assert len(server.requests) == sent + len(new) and again.stdout == ""
    assert front_matter(read_post(config))["reviewed"] is False  # the other parts are the model's


def test_a_title_and_an_introduction_edited_are_kept_and_translated(config, server):
    build(config)
    text = read_post(config).replace(f"title: {TITLE}\n", "title: How pick() chooses\n")
    post_path(config).write_text(text.replace(INTRO, "Why the *first* best score wins."), encoding="utf-8")

    build(config)

    english = read_post(config)
    assert front_matter(english)["title"] == "How pick() chooses" and "Why the *first* best score wins." in english
    assert edits_file(config)["title"] == "How pick() chooses"
    chinese = read_post(config, "zh")
    assert front_matter(chinese)["title"] == fake_translation("How pick() chooses", "zh")
    assert fake_translation("Why the *first* best score wins.", "zh") in chinese


@pytest.mark.slow  # several full builds in subprocesses: make test, not test-fast
def test_changed_code_keeps_the_edit_and_marks_it_stale_and_strict_fails(config, server):
    build(config)
    edit_post(config, explanation(LOOP), EDIT_LOOP)
    build(config)
    code = config.parent / "code" / "sampler.py"
    code.write_text(SAMPLE.replace("if p > probs[best]:", "if p >= probs[best]:"), encoding="utf-8")

    result = build(config)

    english = read_post(config)
    assert EDIT_LOOP in english and "if p >= probs[best]:" in english
    loop = places(config)[LOOP]
    assert front_matter(english)["stale"] == [loop] and front_matter(english)["reviewed"] is False
    assert front_matter(read_post(config, "zh"))["stale"] == [loop]
    stale = [line for line in result.stderr.splitlines() if f"({loop}) is stale" in line]
    assert len(stale) == 2  # as it is found, and in the summary
    assert "-    if p > probs[best]:" in result.stderr and "+    if p >= probs[best]:" in result.stderr  # as shown

    strict = run_build(config, "--strict")

    assert strict.returncode == 1 and "Traceback" not in strict.stderr
    errors = [line for line in strict.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "sampler: piece " in errors[0] and f"({loop}) is stale" in errors[0]
    assert EDIT_LOOP in read_post(config)  # the files are written all the same

    # Editing the text again settles it: the author has read it against the new code.
    edit_post(config, EDIT_LOOP, EDIT_LOOP + " Ties go to the later score now.")
    settled = run_build(config, "--strict")
    assert settled.returncode == 0, settled.stderr
    assert "stale" not in front_matter(read_post(config))
    assert [piece["text"] for piece in edits_file(config)["pieces"].values()] == [
        EDIT_LOOP + " Ties go to the later score now."
    ]


@pytest.mark.slow  # several full builds in subprocesses: make test, not test-fast
def test_a_stale_piece_is_shown_with_its_diff_and_accepted_for_the_new_code(config):
    build(config)
    edit_post(config, explanation(LOOP), EDIT_LOOP)
    build(config)
    code = config.parent / "code" / "sampler.py"
    code.write_text(SAMPLE.replace("if p > probs[best]:", "if p >= probs[best]:"), encoding="utf-8")
    build(config)
    loop = places(config)[LOOP]
    new_id = piece_id_of(config, LOOP)

    listing = review(config)

    [heading] = [line for line in piece_headings(listing.stdout) if line.startswith(f"piece {new_id}")]
    assert heading == f"piece {new_id}, {loop} (stale: the code changed since the author's text was written)"
    assert "    -    if p > probs[best]:" in listing.stdout and f"    {EDIT_LOOP}" in listing.stdout

    assert review(config, "--accept", new_id).exit_code == 0
    assert run_build(config, "--strict").returncode == 0
    [(key, piece)] = edits_file(config)["pieces"].items()
    assert key == new_id and piece["text"] == EDIT_LOOP and "if p >= probs[best]:" in piece["code"]
    assert "stale" not in front_matter(read_post(config))


def review(config, *args: str):
    return CliRunner().invoke(main, ["review", "sampler", "--config", str(config), *args])


def piece_headings(listing: str) -> list[str]:
    return [line for line in listing.splitlines() if line and not line.startswith(" ")]


def test_review_shows_and_accepts_and_reviewed_appears_only_when_all_are(config, server):
    build(config)

    listing = review(config)

    assert listing.exit_code == 0, listing.output
    headings = piece_headings(listing.stdout)
    assert headings[:2] == ["title (not reviewed)", "intro (not reviewed)"]
    assert [heading.split(", ")[1] for heading in headings[2:]] == [
        f"{place} (not reviewed)" for place in places(config).values()
    ]
    assert f"    {SCALE}" in listing.stdout and f"    {explanation(SCALE)}" in listing.stdout  # code and text
    assert "0 of 6 part(s)" not in listing.stderr and "6 of 6 part(s) not reviewed" in listing.stderr
    scale_id = headings[3].split(",")[0].removeprefix("piece ")

    accepted = review(config, "--accept", scale_id, "--accept", "title")

    assert accepted.exit_code == 0, accepted.output
    assert edits_file(config)["title"] == TITLE
    assert edits_file(config)["pieces"][scale_id]["text"] == explanation(SCALE)
    left = review(config)
    assert len(piece_headings(left.stdout)) == 4 and scale_id not in left.stdout
    sent = len(server.requests)
    build(config)
    assert front_matter(read_post(config))["reviewed"] is False

    assert review(config, "--accept", "all").exit_code == 0
    build(config)

    assert len(server.requests) == sent  # accepting the model's text asks nothing again
    for lang in LANGUAGES:
        assert front_matter(read_post(config, lang))["reviewed"] is True
    done = review(config)
    assert done.stdout == "" and "0 of 6 part(s) not reviewed" in done.stderr


def test_review_mistakes_are_one_line(config):
    not_built = review(config)
    assert not_built.exit_code == 1 and not_built.stderr.count("\n") == 1
    assert "post 'sampler' is not built yet" in not_built.stderr and "run explainer build" in not_built.stderr
    build(config)
    no_part = review(config, "--accept", "0123456789ab")
    assert no_part.exit_code == 1 and no_part.stderr.count("\n") == 1
    assert "post 'sampler' has no part '0123456789ab'; accept title, intro, a piece's id" in no_part.stderr
    unknown = CliRunner().invoke(main, ["review", "nope", "--config", str(config)])
    assert unknown.exit_code == 1 and "no post 'nope' in explainer.toml; choose from sampler" in unknown.stderr


def test_a_handwritten_post_has_nothing_to_review(tmp_path, openai_env):
    site = tmp_path / "site"
    (site / "_sources").mkdir(parents=True)
    (site / "_sources" / "notes.md").write_text("# Notes\n\nMine.\n", encoding="utf-8")
    settings_ = {"site": {"languages": ["en"]}, "posts": [{"date": "2024-05-01", "markdown": "_sources/notes.md"}]}
    (site / "explainer.toml").write_text(to_toml(settings_), encoding="utf-8")
    result = CliRunner().invoke(main, ["review", "notes", "--config", str(site / "explainer.toml")])
    assert result.exit_code == 1 and "post 'notes' is hand-written: its text is its author's already" in result.stderr


def test_liquid_in_an_edit_is_shown_as_written_and_stays_put(config, server):
    build(config)
    written = "Compares `{{ p }}` with the best, as a template would show {% it %}."
    edit_post(config, explanation(LOOP), written)
    build(config)
    assert edits_file(config)["pieces"]  # kept as the author wrote it, unescaped
    assert [piece["text"] for piece in edits_file(config)["pieces"].values()] == [written]
    first = read_post(config)
    assert "{% raw %}\n" + written + "\n{% endraw %}" in first  # Jekyll shows it literally

    again = build(config)
    assert again.stdout == "" and read_post(config) == first


def test_edits_to_both_the_post_and_the_edits_file_are_refused(config):
    build(config)
    edit_post(config, explanation(LOOP), EDIT_LOOP)
    build(config)
    edits = config.parent / "explanations" / "sampler.toml"
    edits.write_text(edits.read_text(encoding="utf-8").replace("so far", "yet"), encoding="utf-8")
    edit_post(config, EDIT_LOOP, "Another text.")
    before = edits.read_bytes()

    result = run_build(config)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "was edited both in" in result.stderr and "undo one of the two edits" in result.stderr
    assert edits.read_bytes() == before and "Another text." in read_post(config)  # nothing lost


def piece_id_of(config, first_line: str) -> str:
    """The id of the piece whose code starts with `first_line`, from the marker above its code block."""
    last_marker = ""
    for line in read_post(config).splitlines():
        if line.startswith("<!-- explainer: piece "):
            last_marker = line
        elif line == first_line:
            return last_marker.split("piece ")[1].split(" -->")[0]
    raise AssertionError(f"no piece starts with {first_line}")


def test_a_hand_edited_edits_file_is_published(config):
    build(config)
    piece_id = piece_id_of(config, SCALE)
    edits = config.parent / "explanations" / "sampler.toml"
    edits.parent.mkdir()
    edits.write_text(f"intro = 'Written by hand.'\n\n[pieces.{piece_id}]\ntext = '''\nBy hand too.'''\n", "utf-8")

    build(config)

    english = read_post(config)
    assert "Written by hand." in english and "By hand too." in english and INTRO not in english


@pytest.mark.parametrize(
    "content, message",
    [
        ("title = ", "explanations/sampler.toml is not valid TOML"),
        ("[pieces.abc]\ncode = 'x'\n", "[pieces.abc] needs text = '...'"),
        ("[pieces.abc]\ntext = 'x'\nwords = 'y'\n", "[pieces.abc]: unknown key 'words'"),
        ("titel = 'x'\n", "unknown key 'titel'; expected title, intro and [pieces.ID] tables"),
        ("intro = 3\n", "intro should be text"),
    ],
)
def test_a_broken_edits_file_is_one_clear_line(config, server, content, message):
    edits = config.parent / "explanations" / "sampler.toml"
    edits.parent.mkdir()
    edits.write_text(content, encoding="utf-8")
    result = CliRunner().invoke(main, ["build", "--config", str(config), "--trust-config", "--lang", "en"])
    assert result.exit_code == 1 and message in result.stderr and server.requests == []  # before any model is asked
    assert result.stderr.splitlines()[-1].startswith("Error: post 'sampler': ")


@pytest.mark.parametrize("kind", ["explainer: piece ", "explainer: pieces -->"])
def test_a_post_whose_markers_were_removed_is_not_overwritten(config, kind):
    build(config)
    marker = next(line for line in read_post(config).splitlines() if kind in line)
    edit_post(config, marker + "\n", "")
    edited = read_post(config)

    result = run_build(config)

    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"the line `{marker}` is missing" in result.stderr and "put it back" in result.stderr
    assert read_post(config) == edited


def test_a_build_killed_with_edits_pending_loses_nothing(tmp_path, config, scripted_server):
    build(config)
    edit_post(config, explanation(SCALE), EDIT_SCALE)
    edit_post(config, explanation(LOOP), EDIT_LOOP)
    edited = body(read_post(config))

    translating, release = threading.Event(), threading.Event()

    def held(request):  # translations wait until the build is killed
        if is_translation(request):
            translating.set()
            release.wait()
        return script(request)

    holding = scripted_server(held)
    command = [sys.executable, "-m", "explainer", "build", "--config", str(config), "--trust-config"]
    command += ["--base-url", holding.base_url]
    environment = {key: value for key, value in os.environ.items() if key != "EXPLAINER_CACHE_DIR"}
    with open(tmp_path / "stderr.txt", "w+", encoding="utf-8") as log:
        returncode, _ = interrupt_when(command, environment, translating, release, signal.SIGKILL, log)

    assert returncode == -signal.SIGKILL
    assert sorted(piece["text"] for piece in edits_file(config)["pieces"].values()) == sorted([EDIT_SCALE, EDIT_LOOP])
    assert body(read_post(config)) == edited  # rewritten whole, or not yet: the edits are there either way

    build(config)

    assert body(read_post(config)) == edited
    assert translated_loop_edit() in read_post(config, "zh")


def test_explain_output_file_keeps_edits_in_markdown_and_json(tmp_path, server, openai_env):
    code = tmp_path / "sampler.py"
    code.write_text(SAMPLE, encoding="utf-8")

    def explain(output, *args):
        result = CliRunner().invoke(
            main,
            ["explain", str(code), "--max-lines", "4", "--base-url", server.base_url, "--no-cache", "-o", str(output)]
            + list(args),
        )
        assert result.exit_code == 0, result.output
        return output.read_text(encoding="utf-8")

    post = tmp_path / "out" / "sampler.md"
    explain(post)
    post.write_text(post.read_text(encoding="utf-8").replace(explanation(LOOP), EDIT_LOOP), encoding="utf-8")
    assert EDIT_LOOP in explain(post)
    assert (tmp_path / "out" / "explanations" / "sampler.toml").exists()

    data = tmp_path / "out" / "data.json"
    written = json.loads(explain(data, "--format", "json"))
    written["intro"] = "Edited in the JSON."
    [section] = [s for s in written["sections"] if s["code"].strip().startswith("return")]
    section["explanation"] = "Returns the index."
    data.write_text(json.dumps(written), encoding="utf-8")

    again = json.loads(explain(data, "--format", "json"))

    assert again["intro"] == "Edited in the JSON." and again["intro_authored"] is True
    [section] = [s for s in again["sections"] if s["code"].strip().startswith("return")]
    assert section["explanation"] == "Returns the index." and section["authored"] is True
    kept = tomllib.loads((tmp_path / "out" / "explanations" / "data.toml").read_text(encoding="utf-8"))
    assert kept["intro"] == "Edited in the JSON."


def test_a_stale_text_goes_to_the_piece_its_code_became():
    edits = Edits(
        path=None,
        parts={
            "aaaaaaaaaaaa": AuthorText("loop", code="for x in xs:\n    total += x"),
            "bbbbbbbbbbbb": AuthorText("ret", code="return total"),
            "cccccccccccc": AuthorText("gone", code="print('a long line that is gone for good')"),
        },
    )
    pieces = [
        Piece("111111111111", "total = 0", "1"),
        Piece("222222222222", "for x in xs:\n    total += x * x", "2-3"),
        Piece("333333333333", "return total / n", "4"),
    ]
    placement = place(edits, pieces)
    assert placement.by_piece == {"222222222222": "aaaaaaaaaaaa", "333333333333": "bbbbbbbbbbbb"}
    assert placement.unplaced == ["cccccccccccc"]


texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=200, deadline=None)
@given(title=texts, text=texts, code=texts)
def test_the_edits_file_reads_back_what_was_written(tmp_path_factory, title, text, code):
    path = tmp_path_factory.mktemp("edits") / "post.toml"
    edits = Edits(path, {"title": AuthorText(title), "abcdef012345": AuthorText(text, code, "3-5")})
    path.write_text(edits_toml(edits, "post 'x'"), encoding="utf-8")
    assert load_edits(path).parts == edits.parts


def test_load_edits_names_the_file_in_its_errors(tmp_path):
    path = tmp_path / "post.toml"
    path.write_text("[pieces]\nabc = 'x'\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"post.toml: \[pieces.abc\] should be a table"):
        load_edits(path)
