"""`explainer build` per language: a language routed to a backend of its own ([languages.<code>]), the line
a build says first about languages its local model was measured not to translate, and the meaning checks'
setting ([translate] verify, --verify)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt
from mdit_py_plugins.front_matter import front_matter_plugin
from ruamel.yaml import YAML
from site_support import is_translation, make_site, site_script

from explainer.cli import main
from explainer.errors import UserError
from explainer.languages import known_languages
from explainer.site_config import VERIFY_SETTINGS, load_config
from explainer.translate import VERIFY_CHOICES
from llama_ref.catalog import CATALOG, DEFAULT_MODEL

PARSER = MarkdownIt("commonmark").use(front_matter_plugin)


def front_matter(markdown: str) -> dict:
    [token] = [token for token in PARSER.parse(markdown) if token.type == "front_matter"]
    return YAML(typ="safe").load(token.content)


def add_toml(config, text: str) -> None:
    config.write_text(config.read_text(encoding="utf-8") + "\n" + text, encoding="utf-8")


def build(config, *args: str):
    return CliRunner().invoke(main, ["build", "--config", str(config), "--trust-config", *args])


def target(body: dict) -> str:
    return body["messages"][0]["content"].split(" into ", 1)[1].split(" ", 1)[0]


@pytest.fixture
def site(tmp_path, scripted_server, openai_env):
    server = scripted_server(site_script)
    return server, make_site(tmp_path, server.base_url, ["en", "zh", "ar"])


def test_a_routed_language_goes_to_its_own_backend_and_names_its_model(site, scripted_server):
    main_server, config = site
    routed = scripted_server(site_script)
    add_toml(config, f'[languages.ar]\nbackend = "openai"\nmodel = "big-model"\nbase_url = "{routed.base_url}"\n')

    result = build(config)

    assert result.exit_code == 0, result.output
    assert {target(body) for body in routed.requests} == {"Arabic"}
    assert {body["model"] for body in routed.requests} == {"big-model"}
    assert "Arabic" not in {target(body) for body in main_server.requests if is_translation(body)}
    posts = config.parent / "_posts"
    generated = {lang: (posts / lang / f"2024-05-01-llama-generate-{lang}.md").read_text() for lang in ("zh", "ar")}
    assert "big-model" in generated["ar"] and "big-model" not in generated["zh"]  # the translation notice


def test_keep_source_on_failure_for_one_language(site, scripted_server):
    _, config = site

    def fails_arabic(body):  # every Arabic translation comes back empty
        answer = site_script(body)
        if is_translation(body) and target(body) == "Arabic":
            return json.dumps({key: "" for key in json.loads(answer)})
        return answer

    failing = scripted_server(fails_arabic)
    add_toml(config, "[languages.ar]\nkeep_source_on_failure = true\n")

    result = build(config, "--base-url", failing.base_url)

    assert result.exit_code == 0, result.output
    arabic = config.parent / "_posts" / "ar" / "2023-08-17-running-llama-ar.md"
    kept = front_matter(arabic.read_text(encoding="utf-8"))["untranslated"]
    assert kept
    # each Arabic segment asked again, counted once (those of the other post too), and nothing else
    other = front_matter((arabic.parent / "2024-05-01-llama-generate-ar.md").read_text(encoding="utf-8"))
    assert f"{len(kept) + len(other['untranslated'])} segment(s) asked again" in result.output
    chinese = config.parent / "_posts" / "zh" / "2023-08-17-running-llama-zh.md"
    assert "untranslated" not in front_matter(chinese.read_text(encoding="utf-8"))


def test_a_language_routed_to_an_api_that_is_not_configured_keeps_its_source_text(site, monkeypatch):
    # Hindi on the example site: to an API where one is configured, else kept in English and listed
    main_server, config = site  # its [backend] names its server, which needs no key
    monkeypatch.delenv("OPENAI_API_KEY")
    add_toml(config, '[languages.ar]\nbackend = "openai"\nkeep_source_on_failure = true\n')

    result = build(config)

    assert result.exit_code == 0, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("warning: ar:")]
    assert "no API configured here (no OPENAI_API_KEY" in line and "keep the en text" in line
    assert "untranslated:" in line and "configure one to translate ar" in line
    assert result.output.index(line) < result.output.index("written")  # said before any page is written
    assert "Arabic" not in {target(body) for body in main_server.requests if is_translation(body)}
    posts = config.parent / "_posts"
    for name in ("2023-08-17-running-llama", "2024-05-01-llama-generate"):
        english = (posts / "en" / f"{name}-en.md").read_text(encoding="utf-8")
        arabic = (posts / "ar" / f"{name}-ar.md").read_text(encoding="utf-8")
        assert front_matter(arabic)["untranslated"], name
        assert "not configured" not in arabic  # no translation notice naming a model that did not translate
        chinese = (posts / "zh" / f"{name}-zh.md").read_text(encoding="utf-8")
        assert "untranslated" not in front_matter(chinese)
        # the prose is the English page's, as it is (the page's own notices come in Arabic from the language file)
        paragraphs = [t.content for t in PARSER.parse(english) if t.type == "inline" and len(t.content) > 40]
        assert len([text for text in paragraphs if text in arabic]) >= len(paragraphs) / 2, name


def test_without_keep_source_an_unconfigured_route_stops_the_build_in_one_line(site, monkeypatch):
    _, config = site
    monkeypatch.delenv("OPENAI_API_KEY")
    add_toml(config, '[languages.ar]\nbackend = "openai"\n')

    result = build(config)

    assert result.exit_code != 0
    [line] = result.output.strip().splitlines()  # before any work
    assert line.startswith("Error: ") and "[languages.ar] backend = 'openai' has no API configured here" in line
    assert "keep_source_on_failure = true" in line and "drop ar" in line


def local_site(config, languages: list[str], extra: str = "") -> None:
    text = config.read_text(encoding="utf-8")
    start = text.index("[backend]")
    end = text.index("\n\n", start)
    text = text[:start] + '[backend]\nname = "local"' + text[end:]
    text = text.replace('languages = ["en", "zh", "ar"]', f"languages = {json.dumps(languages)}")
    config.write_text(text + "\n" + extra, encoding="utf-8")


def test_a_build_says_first_which_languages_its_local_model_does_not_translate(site):
    _, config = site
    fails = CATALOG[DEFAULT_MODEL].site_fails
    assert fails, "the default model's measured failures are what this test needs"
    unknown = next(
        lang for lang in known_languages() if lang != "en" and CATALOG[DEFAULT_MODEL].translates_site(lang) is None
    )
    local_site(config, ["en", unknown, *fails])

    result = build(config, "--dry-run")  # says it before any work, and loads no model to say it

    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    [line] = warnings
    assert f"{DEFAULT_MODEL} failed the checks in {', '.join(fails)} when measured" in line
    assert f"[languages.{fails[0]}] backend" in line and "--keep-source-on-failure" in line and "drop them" in line
    assert unknown not in line.split(" when ", 1)[0]  # not measured: not claimed either way

    kept = build(config, "--dry-run", "--keep-source-on-failure")
    assert not [line for line in kept.stderr.splitlines() if line.startswith("warning:")]


def test_a_routed_language_is_not_warned_about(site):
    _, config = site
    fails = CATALOG[DEFAULT_MODEL].site_fails
    routes = "".join(f'[languages.{lang}]\nbackend = "openai"\nmodel = "big-model"\n' for lang in fails[1:])
    local_site(config, ["en", *fails], routes)

    result = build(config, "--dry-run")

    [line] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert f"failed the checks in {fails[0]} when" in line and "drop it" in line


@pytest.mark.parametrize(
    "toml, message",
    [
        ('[languages.xx]\nbackend = "openai"\n', "[languages.xx]: unknown language 'xx'"),
        ('[languages.ja]\nbackend = "openai"\n', "[languages.ja]: ja is not in [site] languages; add it there"),
        ('[languages.en]\nbackend = "openai"\n', "[languages.en]: en is the source language"),
        ('[languages.ar]\nbackend = "claude"\n', "[languages.ar] backend: unknown backend 'claude'; use one of"),
        ('[languages.ar]\nmodel = "big-model"\n', "[languages.ar]: model needs the backend it is for in the same"),
        (
            '[languages.ar]\nbackend = "local"\nbase_url = "http://127.0.0.1:9/v1"\n',
            "[languages.ar]: base_url is for the openai backend; leave it out with backend = 'local'",
        ),
        ("[languages.ar]\ncolour = 1\n", "unknown key 'colour' in [languages.ar]; expected one of backend,"),
        ('[languages.ar]\nkeep_source_on_failure = "yes"\n', "keep_source_on_failure = 'yes' should be true or"),
        ('[languages]\nar = "openai"\n', "[languages.ar] must be a table, like [languages.ar] then backend ="),
        ('[translate]\nverify = "roundtrip"\n', "[translate] verify = 'roundtrip'; write one of \"round-trip\" or"),
        ("[translate]\nchecks = 1\n", "unknown key 'checks' in [translate]; expected one of verify"),
    ],
)
def test_language_and_translate_mistakes_are_one_clear_line(site, toml, message):
    _, config = site
    add_toml(config, toml)
    with pytest.raises(UserError) as error:
        load_config(config, trust=True)
    assert message in str(error.value)

    result = build(config)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("Error: explainer.toml")
    assert message in result.stderr


def test_an_untrusted_configs_language_server_does_not_get_the_key(tmp_path, openai_env):
    site = tmp_path / "site"
    (site / "_sources").mkdir(parents=True)
    (site / "_sources" / "post.md").write_text("Some prose to translate.\n", encoding="utf-8")
    (site / "explainer.toml").write_text(
        '[site]\nlanguages = ["en", "ar"]\n\n[backend]\nname = "openai"\n\n'
        '[languages.ar]\nbackend = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n\n'
        '[[posts]]\ndate = "2024-01-02"\nmarkdown = "_sources/post.md"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["build", "--config", str(site / "explainer.toml")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "[languages.ar] base_url = 'http://127.0.0.1:9/v1' would get your OPENAI_API_KEY" in result.stderr
    assert "--trust-config" in result.stderr
    assert not (site / "_posts").exists()


class ReadsBack:
    """site_script's translator, which also reads each of its translations back as the source it came from."""

    def __init__(self):
        self.sources: dict[str, str] = {}
        self.read_backs = 0

    def __call__(self, body: dict) -> str:
        if is_translation(body) and target(body) == "English":
            self.read_backs += 1
            sent = json.loads(body["messages"][-1]["content"])
            return json.dumps({key: self.sources[text] for key, text in sent.items()}, ensure_ascii=False)
        answer = site_script(body)
        if is_translation(body):
            sent = json.loads(body["messages"][-1]["content"])
            self.sources.update({json.loads(answer)[key]: text for key, text in sent.items()})
        return answer


@pytest.mark.parametrize(
    "setting, flag, reads_back",
    [
        (None, None, False),  # an API: off by default
        ("round-trip", None, True),
        ("round-trip", "none", False),  # the flag over the file
        (None, "round-trip", True),
    ],
)
def test_the_meaning_checks_follow_the_file_and_the_flag(site, scripted_server, setting, flag, reads_back):
    _, config = site
    model = ReadsBack()
    server = scripted_server(model)
    if setting:
        add_toml(config, f'[translate]\nverify = "{setting}"\n')

    result = build(config, "--base-url", server.base_url, "--only", "running-llama", *(["--verify", flag] * bool(flag)))

    assert result.exit_code == 0, result.output
    assert bool(model.read_backs) == reads_back


def test_the_verify_choices_are_one_list():
    assert tuple(VERIFY_SETTINGS) == VERIFY_CHOICES
    for command in ("translate", "build"):
        [option] = [param for param in main.commands[command].params if param.name == "verify"]
        assert tuple(option.type.choices) == VERIFY_CHOICES


def test_the_catalog_claims_only_languages_it_measured():
    for model in CATALOG.values():
        assert set(model.site_passes) <= set(known_languages()) and set(model.site_fails) <= set(known_languages())
        assert not set(model.site_passes) & set(model.site_fails)
        assert model.translates_site("no-such-language") is None
