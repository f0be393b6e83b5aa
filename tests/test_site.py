"""`explainer build`: every post in every language, only what changed redone, nothing rewritten for nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin
from ruamel.yaml import YAML
from site_support import (
    GENERATED_DEMO,
    STAND_IN_DEMO,
    is_translation,
    make_site,
    run_build,
    site_script,
    snapshot,
    to_toml,
)

from explainer.cli import main
from explainer.errors import UserError
from explainer.site import BuildOptions, build_site
from explainer.site_config import load_config

LANGUAGES = ["en", "zh", "ar"]
PARSER = MarkdownIt("commonmark").use(front_matter_plugin)


def fences(markdown: str) -> list[tuple[str, str]]:
    return [(token.info, token.content) for token in PARSER.parse(markdown) if token.type == "fence"]


def front_matter(markdown: str) -> dict:
    [token] = [token for token in PARSER.parse(markdown) if token.type == "front_matter"]
    return YAML(typ="safe").load(token.content)


@pytest.fixture
def server(scripted_server):
    return scripted_server(site_script)


@pytest.fixture
def config(tmp_path, server, openai_env):
    return make_site(tmp_path, server.base_url, LANGUAGES)


def post_files(config, slug: str, date: str) -> dict[str, str]:
    posts = config.parent / "_posts"
    return {lang: (posts / lang / f"{date}-{slug}-{lang}.md").read_text(encoding="utf-8") for lang in LANGUAGES}


def test_build_writes_every_post_in_every_language_in_the_seed_authors_layout(config, server):
    result = run_build(config)
    assert result.returncode == 0, result.stderr
    posts = config.parent / "_posts"
    expected = [
        posts / lang / name for name in ("2024-05-01-llama-generate", "2023-08-17-running-llama") for lang in LANGUAGES
    ]
    assert result.stdout.split() == [f"{path}-{path.parent.name}.md" for path in expected]
    assert "2 post(s) × 3 language(s): 6 file(s) written, 0 unchanged" in result.stderr
    assert (
        f"{len(server.requests)} request(s), 0 cache hit(s), 0 segment(s) asked again; 2 demo run(s)" in result.stderr
    )
    assert "running-llama: ar written" in result.stderr  # plain progress lines when not on a terminal

    for slug, date in (("running-llama", "2023-08-17"), ("llama-generate", "2024-05-01")):
        pages = post_files(config, slug, date)
        for lang, page in pages.items():
            assert front_matter(page)["lang"] == lang
            assert front_matter(page)["dir"] == ("rtl" if lang == "ar" else "ltr")
            assert front_matter(page)["ref"] == slug  # links a post's languages
            assert fences(page) == fences(pages["en"])  # code and demo output: identical everywhere
        assert front_matter(pages["zh"])["title"] != front_matter(pages["en"])["title"]

    generated = fences(post_files(config, "llama-generate", "2024-05-01")["en"])
    assert generated[-2:] == [("sh", GENERATED_DEMO + "\n"), ("", "The capital of France is Paris.\n")]
    handwritten = fences(post_files(config, "running-llama", "2023-08-17")["en"])
    [demo_index] = [index for index, (_, code) in enumerate(handwritten) if code.startswith("python -c")]
    assert handwritten[demo_index] == ("sh", STAND_IN_DEMO + "\n")  # literal in the file too, inside {% raw %}
    assert handwritten[demo_index + 1][0] == ""  # its output, a plain block right below it
    assert handwritten[demo_index + 1][1].endswith("achieved tok/s: 185.527329\n")


def test_warm_rebuild_asks_no_model_runs_no_demo_and_rewrites_no_file(config, server):
    first = build_site(load_config(config, trust=True))
    assert len(first.written) == 6 and first.demo_runs == 2 and first.usage.requests == len(server.requests)
    before = snapshot(config.parent / "_posts")
    sent = len(server.requests)

    result = run_build(config)

    assert result.returncode == 0, result.stderr
    assert len(server.requests) == sent
    assert "6 unchanged; 0 request(s)" in result.stderr and "0 demo run(s), 2 from cache" in result.stderr
    assert result.stdout == ""  # no file written
    assert snapshot(config.parent / "_posts") == before  # bytes and mtimes


def test_editing_one_paragraph_retranslates_that_paragraph_only(config, server):
    build_site(load_config(config, trust=True))
    generated_before = {
        path: data for path, data in snapshot(config.parent / "_posts").items() if "llama-generate" in path
    }
    source = config.parent / "_sources" / "running-llama.md"
    old = "These pages helped me install the driver:"
    source.write_text(source.read_text(encoding="utf-8").replace(old, "These pages helped me a lot:"), encoding="utf-8")
    sent = len(server.requests)

    report = build_site(load_config(config, trust=True))

    new_requests = server.requests[sent:]
    assert len(new_requests) == 2 and all(is_translation(body) for body in new_requests)  # zh and ar
    assert [list(json.loads(body["messages"][-1]["content"]).values()) for body in new_requests] == [
        ["These pages helped me a lot:"]
    ] * 2
    assert report.demo_runs == 0
    assert sorted(path.name for path in report.written) == [
        f"2023-08-17-running-llama-{lang}.md" for lang in sorted(LANGUAGES)
    ]
    assert {
        path: data for path, data in snapshot(config.parent / "_posts").items() if "llama-generate" in path
    } == generated_before


def test_rerun_demos_runs_them_again_and_rewrites_only_what_changed(config):
    build_site(load_config(config, trust=True))
    report = build_site(load_config(config, trust=True), BuildOptions(rerun_demos=True))
    assert report.demo_runs == 2 and report.demo_cache_hits == 0
    assert report.written == []  # same output, same bytes


def test_only_and_lang_build_just_that(config, server):
    result = run_build(config, "--only", "running-llama", "--lang", "zh")
    assert result.returncode == 0, result.stderr
    written = sorted(path.relative_to(config.parent).as_posix() for path in (config.parent / "_posts").rglob("*.md"))
    assert written == ["_posts/zh/2023-08-17-running-llama-zh.md"]
    assert all(is_translation(body) for body in server.requests)  # the other post was not explained


def test_dry_run_lists_the_files_and_does_nothing(config, server):
    result = run_build(config, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 6 and "Dry run: 2 post(s) × 3 language(s)" in result.stderr
    assert server.requests == []
    assert not (config.parent / "_posts").exists() and not (config.parent / ".explainer-cache").exists()


def test_a_failing_demo_fails_the_build_and_shows_the_end_of_its_output(config):
    source = config.parent / "_sources" / "running-llama.md"
    failing = "python -c \"import sys; print('loading weights'); sys.exit('CUDA out of memory')\""
    source.write_text(source.read_text(encoding="utf-8").replace(STAND_IN_DEMO, failing), encoding="utf-8")

    result = run_build(config, "--only", "running-llama")

    assert result.returncode == 1
    error = result.stderr[result.stderr.index("Error: ") :]
    assert error.startswith("Error: post 'running-llama': demo at running-llama.md:")
    assert "failed with exit code 1" in error and "loading weights\nCUDA out of memory" in error
    assert "Traceback" not in result.stderr
    assert not (config.parent / "_posts").exists()


def test_a_language_whose_translation_fails_is_not_written_and_the_others_are(config, scripted_server):
    def fails_arabic(body):  # a model that answers every Arabic translation with empty text
        answer = site_script(body)
        if is_translation(body) and "into Arabic " in body["messages"][0]["content"]:
            return json.dumps({key: "" for key in json.loads(answer)})
        return answer

    failing = scripted_server(fails_arabic)
    result = run_build(config, "--base-url", failing.base_url)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    posts = config.parent / "_posts"
    assert sorted(path.parent.name for path in posts.glob("*/*.md")) == ["en", "en", "zh", "zh"]
    not_written = [line for line in result.stderr.splitlines() if "not written, its translation failed" in line]
    assert len(not_written) == 2 and all(
        "/ar/" in line and "failed even when sent alone" in line for line in not_written
    )
    assert result.stderr.splitlines()[-1].startswith("Error: 2 file(s) not written because a translation failed")
    # the log says why as soon as a language fails, not only at the end of a long build
    assert any(": ar failed: " in line and "failed even when sent alone" in line for line in result.stderr.splitlines())

    again = run_build(config)  # the faithful server: only Arabic is left to do
    assert again.returncode == 0, again.stderr
    assert "2 file(s) written, 4 unchanged" in again.stderr
    assert sorted(path.parent.name for path in posts.glob("*/*.md")) == ["ar", "ar", "en", "en", "zh", "zh"]


def test_no_demos_runs_nothing_and_publishes_the_demo_code_alone(config, tmp_path):
    source = config.parent / "_sources" / "running-llama.md"
    ran = tmp_path / "the-demo-ran"
    source.write_text(source.read_text(encoding="utf-8").replace(STAND_IN_DEMO, f"touch {ran}"), encoding="utf-8")

    result = run_build(config, "--no-demos", "--lang", "en")

    assert result.returncode == 0, result.stderr
    assert not ran.exists()
    assert "0 demo run(s), 0 from cache" in result.stderr
    posts = config.parent / "_posts" / "en"
    handwritten = (posts / "2023-08-17-running-llama-en.md").read_text(encoding="utf-8")
    assert [code for _, code in fences(handwritten)] == [code for _, code in fences(source.read_text(encoding="utf-8"))]
    assert ("sh", f"touch {ran}\n") in fences(handwritten)  # the demo marker dropped, no output below
    generated = (posts / "2024-05-01-llama-generate-en.md").read_text(encoding="utf-8")
    assert GENERATED_DEMO not in generated
    assert not (config.parent / ".explainer-cache" / "demos").exists()

    both = CliRunner().invoke(main, ["build", "--config", str(config), "--trust-config", "--no-demos", "--rerun-demos"])
    assert both.exit_code == 1 and both.stderr.startswith("Error: --no-demos runs no demo")


def edit_config(config, edit) -> None:
    from site_support import tomllib

    data = tomllib.loads(config.read_text(encoding="utf-8"))
    edit(data)
    config.write_text(to_toml(data), encoding="utf-8")


def test_demo_output_limit_caps_what_a_demo_publishes(config):
    edit_config(config, lambda c: c["site"].update(demo_output_limit=20))
    result = run_build(config, "--only", "running-llama", "--lang", "en")
    assert result.returncode == 0, result.stderr
    post = config.parent / "_posts" / "en" / "2023-08-17-running-llama-en.md"
    published = fences(post.read_text(encoding="utf-8"))
    [demo_index] = [index for index, (_, code) in enumerate(published) if code.startswith("python -c")]
    assert published[demo_index + 1] == ("", "Once upon a time, a\n… output truncated: 20 bytes shown of 91 bytes\n")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["posts"][0].pop("date"), 'post 1 (llama-generate) needs date = "YYYY-MM-DD"'),
        (lambda c: c["posts"][1].update(file="x.py"), "post 2 needs exactly one of `file`"),
        (lambda c: c["posts"][0].update(file="no/such.py"), "post 1: file no/such.py does not exist"),
        (lambda c: c["site"].update(pattern="_posts/{date}-{slug}.md"), "must contain {lang} and {slug}"),
        (lambda c: c["site"].update(pattern="_posts/{lang}/{title}.md"), "pattern uses {title}"),
        (lambda c: c["site"].update(langs=["en"]), "unknown key 'langs' in [site]"),
        (lambda c: c["site"].update(languages=["en", "xx"]), "unknown language 'xx'"),
        (lambda c: c["posts"][1].update(slug="llama-generate"), "two posts have the slug 'llama-generate'"),
        (
            lambda c: c["backend"].update(name="claude"),
            "[backend] name: unknown backend 'claude'; use one of openai, local",
        ),
        (lambda c: c["posts"][0].update(date="20240105"), 'post 1 (llama-generate) needs date = "YYYY-MM-DD"'),
        (lambda c: c["posts"][0].update(file="../secret.py"), "post 1: file ../secret.py is outside the project root"),
        (
            lambda c: c["posts"][0].update(file="/etc/hostname"),
            "post 1: file /etc/hostname is outside the project root",
        ),
        (lambda c: c["posts"][1].update(markdown="/etc/hostname"), "post 2: markdown file /etc/hostname is outside"),
        (lambda c: c["site"].update(pattern="../{lang}/{slug}.md"), "would write outside the site's output folder"),
        (lambda c: c["site"].update(pattern="/tmp/{lang}/{slug}.md"), "would write outside the site's output folder"),
        (lambda c: c["site"].update(demo_output_limit=0), "demo_output_limit must be positive"),
        (lambda c: c["site"].update(demo_timeout=0), "[site] demo_timeout = 0; write a number of seconds above 0"),
        (lambda c: c["site"].update(demo_timeout=1e308), "[site] demo_timeout = 1e+308; write a number of seconds"),
        (lambda c: c["site"].update(demo_output_limit="1M"), "demo_output_limit = '1M' should be a int"),
    ],
)
def test_config_mistakes_are_one_clear_line(config, edit, message):
    edit_config(config, edit)
    with pytest.raises(UserError) as error:
        load_config(config, trust=True)
    assert message in str(error.value)

    result = CliRunner().invoke(main, ["build", "--config", str(config), "--trust-config"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("Error: explainer.toml")
    assert message in result.stderr


def test_missing_config_and_unknown_post_say_what_to_do(config, tmp_path):
    missing = CliRunner().invoke(main, ["build", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "no config file" in missing.stderr and "--config FILE" in missing.stderr
    unknown = CliRunner().invoke(main, ["build", "--config", str(config), "--trust-config", "--only", "nope"])
    assert unknown.exit_code == 1
    assert "--only nope: no such post in explainer.toml; choose from llama-generate, running-llama" in unknown.stderr
