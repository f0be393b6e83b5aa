"""The command line: options in, library calls out, every user error as one line on stderr.

Keep commands thin. Work belongs in the library modules so that it can be called from Python
and tested without a shell.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from explainer.backends import Request
from explainer.errors import UserError


class _OneLineErrors:
    """Mixin for click commands: a UserError becomes `Error: ...` and exit code 1, no traceback,
    unless --debug is given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            # Every file is written atomically and every answer is cached as it arrives, so stopping
            # now loses nothing finished. Exit at once: a normal exit would first wait for the
            # requests still in flight on worker threads, which can take minutes.
            click.echo("Interrupted: the files written are whole; the next run resumes from the cache.", err=True)
            sys.stderr.flush()
            os._exit(130)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="llama-explainer")
def main(debug: bool):
    """Explain source code piece by piece with an LLM, publish the walkthrough as Jekyll posts,
    and translate it without ever touching the code."""


def explain_main():
    """The `explain` console script: `explain FILE ...` is `explainer explain FILE ...`."""
    main.commands["explain"].main(prog_name="explain")


class BackendName(click.ParamType):
    """--backend: a name from the backend registry (explainer.backends.BACKENDS), checked when parsed."""

    name = "backend"

    def get_metavar(self, param, ctx=None) -> str:
        from explainer.backends import BACKENDS

        return "[" + "|".join(BACKENDS) + "]"

    def convert(self, value, param, ctx):
        from explainer.backends import BACKENDS

        if value not in BACKENDS:
            self.fail(f"unknown backend {value!r}; use one of {', '.join(BACKENDS)}", param, ctx)
        return value


class _BackendOption(click.Option):
    """--backend, whose help lists the registry as it is when help is shown."""

    def __init__(self, *args, help_prefix: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.help_prefix = help_prefix

    def get_help_record(self, ctx):
        from explainer.backends import backend_help

        self.help = self.help_prefix + backend_help()
        return super().get_help_record(ctx)


def backend_option(prefix: str = ""):
    return click.option("--backend", cls=_BackendOption, type=BackendName(), help_prefix=prefix)


def verify_option(default_from: str):
    # the choices are explainer.translate.VERIFY_CHOICES, written out: --help imports no translation code
    return click.option(
        "--verify",
        type=click.Choice(["round-trip", "none"]),
        help="Check that each translation means what its source says: read it back into the source language "
        f"(a second request per segment) and check the words links and emphasis mark [default: {default_from}"
        "round-trip for the local model, none for an API].",
    )


def make_backend(name: str | None, model: str | None, base_url: str | None):
    """The backend the --backend, --model and --base-url options ask for (explainer.backends' registry)."""
    from explainer.backends import BackendSettings
    from explainer.backends import make_backend as from_registry

    return from_registry(BackendSettings(name=name, model=model, base_url=base_url))


def open_cache(cache_dir: str | None, no_cache: bool):
    """The answer cache the --cache-dir and --no-cache options ask for (None: no cache)."""
    from explainer.cache import Cache

    return None if no_cache else Cache(cache_dir)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--symbol",
    metavar="NAME",
    help="Explain only this function, class or method: sample_top_p, "
    "Llama.generate (C++: Llama::generate) [default: the whole file].",
)
@backend_option()
@click.option(
    "--model",
    help="Model name (openai) [default: gpt-4o-mini], or a catalog name or checkpoint path "
    "(local) [default: qwen2.5-coder-1.5b; see python -m llama_ref --list-models].",
)
@click.option(
    "--base-url",
    help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 [default: OPENAI_BASE_URL, else api.openai.com].",
)
@click.option(
    "--lang",
    default="en",
    show_default=True,
    metavar="LANG",
    help="Write the explanations in this language: en, zh, ja, ar, ... (see explainer/translations/).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the post to this file (atomically) [default: stdout].",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["markdown", "json"]),
    default="markdown",
    show_default=True,
    help="markdown: a Jekyll post; json: the post's data, with ungrounded names and the sentences left out "
    "past each answer's budget (left_out).",
)
@click.option("--cache-dir", help="Answer cache folder [default: EXPLAINER_CACHE_DIR, else ~/.cache/llama-explainer].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the answer cache.")
@click.option(
    "--max-lines",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Split definitions longer than this into pieces.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=Request.max_tokens,
    show_default=True,
    help="Longest answer the model may give per piece; a longer one is an error.",
)
def explain(
    file: Path,
    symbol: str | None,
    backend: str | None,
    model: str | None,
    base_url: str | None,
    lang: str,
    output: Path | None,
    output_format: str,
    cache_dir: str | None,
    no_cache: bool,
    max_lines: int,
    max_tokens: int,
):
    """Explain FILE (Python, C, C++ or CUDA) piece by piece with an LLM, as a Markdown blog post.

    tree-sitter splits the code into the pieces a person would paste into a chat one at a time;
    the model explains each one, and an introduction. The post goes to stdout (or -o); progress,
    warnings and the usage summary go to stderr. Answers are cached, so a rerun asks the model
    only about pieces that changed. Names an explanation puts in backticks that the code does
    not contain are reported as warnings.

    \b
    Examples:
      explainer explain llama_ref/generation.py --symbol Llama.generate -o generate.md
      explainer explain run.c --backend local --lang zh
    """
    from explainer.edits import edits_path, load_edits, with_author_text
    from explainer.explain import explain_file
    from explainer.fileio import write_atomic
    from explainer.progress import AnswerProgress
    from explainer.render import post_json, render_post

    chosen = make_backend(backend, model, base_url)
    # the author's text of an earlier run's output, kept beside it: its mistakes before any model is asked
    edits = load_edits(edits_path(output.parent, output.stem)) if output is not None else None
    progress = AnswerProgress(f"explaining {file}")
    try:
        post, usage = explain_file(
            file,
            symbol,
            backend=chosen,
            cache=open_cache(cache_dir, no_cache),
            lang=lang,
            max_lines=max_lines,
            max_tokens=max_tokens,
            on_progress=progress,
            on_warning=lambda message: click.echo(f"Warning: {message}", err=True),
        )
    finally:
        progress.close()
    if edits is not None:  # the author's edits to the output file since it was written survive this run
        authored = with_author_text(post, edits, output, markdown=output_format == "markdown", label=output.name)
        for warning in authored.warnings(None, edits.path):
            click.echo(f"Warning: {warning}", err=True)
        post = authored.post
    text = post_json(post, editable=True) if output_format == "json" else render_post(post, editable=True)
    if output is None:
        click.echo(text, nl=False)
    else:
        try:
            write_atomic(output, text)
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror}; check the folder exists and is writable") from None
        click.echo(f"wrote {output}", err=True)
    click.echo(usage.summary(), err=True)


@main.command()
@click.argument("post", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--to",
    "targets",
    required=True,
    metavar="LANGS",
    help="Languages to translate into, comma-separated: zh,ar,ja (see explainer/translations/).",
)
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write DIR/<lang>/<name>-<lang>.md [default: beside the post's language folder].",
)
@click.option(
    "--from", "source_lang", metavar="LANG", help="The post's language [default: front matter lang, else detected]."
)
@backend_option()
@click.option("--model", help="Model name (openai), or a catalog name or checkpoint path (local).")
@click.option("--base-url", help="OpenAI-compatible server [default: OPENAI_BASE_URL, else api.openai.com].")
@click.option("--cache-dir", help="Answer cache folder [default: EXPLAINER_CACHE_DIR, else ~/.cache/llama-explainer].")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the answer cache.")
@click.option(
    "--keep-source-on-failure",
    is_flag=True,
    help="A segment whose translation fails every check and retry keeps its source text, instead of "
    "the language writing nothing; the copy lists it in its front matter (untranslated:).",
)
@verify_option("")
def translate(
    post: Path,
    targets: str,
    output_dir: Path | None,
    source_lang: str | None,
    backend: str,
    model: str | None,
    base_url: str | None,
    cache_dir: str | None,
    no_cache: bool,
    keep_source_on_failure: bool,
    verify: str | None,
):
    """Translate a Markdown post: only prose is sent; code, links and front matter keys stay as they are.

    Every answer is checked first (code byte-identical, same structure, no chatter, right
    language); a segment that fails is asked again alone, up to 3 times, varied. If one still
    fails, nothing is written for that language (or, with --keep-source-on-failure, it keeps its
    source text and is listed).
    """
    from explainer.backends import Usage
    from explainer.languages import language
    from explainer.translate import translate_file

    codes = [code.strip() for code in targets.split(",") if code.strip()]
    if not codes:
        raise UserError("--to needs at least one language, e.g. --to zh,ar")
    for code in codes:
        language(code)  # an unknown code fails here, before a backend is set up
    usage = Usage()
    kept: dict[str, list[str]] | None = {} if keep_source_on_failure else None
    written = translate_file(
        post,
        codes,
        make_backend(backend, model, base_url),
        open_cache(cache_dir, no_cache),
        usage,
        out_dir=output_dir,
        source_lang=source_lang,
        untranslated=kept,
        verify=None if verify is None else verify == "round-trip",
    )
    for path in written:
        click.echo(str(path))
    for code, segments in (kept or {}).items():
        click.echo(
            f"Warning: {code}: {len(segments)} segment(s) left untranslated (listed in the copy's front "
            f"matter): " + " | ".join(segments),
            err=True,
        )
    click.echo(usage.summary(), err=True)


def config_option(help: str):
    """--config FILE, the site's explainer.toml, as build and review take it."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default="explainer.toml",
        show_default=True,
        help=help,
    )


@main.command()
@config_option("The site's config: posts, languages, backend, output.")
@click.option("--only", multiple=True, metavar="POST", help="Build only this post (its slug); repeatable.")
@click.option(
    "--lang",
    "langs",
    multiple=True,
    metavar="LANGS",
    help="Build only these languages, comma-separated or repeated [default: the config's].",
)
@click.option("--dry-run", is_flag=True, help="List the files the build would write; ask no model, run no demo.")
@click.option("--rerun-demos", is_flag=True, help="Run every demo again instead of using its cached output.")
@click.option(
    "--no-demos",
    is_flag=True,
    help="Run no demo: publish demo blocks as plain code without output, and leave out the demos of explained posts.",
)
@click.option(
    "--keep-source-on-failure",
    is_flag=True,
    help="A segment whose translation fails every check and retry keeps its source text, instead of "
    "the language writing nothing; the page lists it in its front matter (untranslated:).",
)
@backend_option(prefix="Override [backend] name. ")
@click.option(
    "--model", help="Override [backend] model: a model name (openai), or a catalog name or checkpoint path (local)."
)
@click.option("--base-url", help="Override the OpenAI-compatible server [default: OPENAI_BASE_URL, else the config's].")
@click.option(
    "--cache-dir",
    help="Cache folder for answers and demo results "
    "[default: EXPLAINER_CACHE_DIR, else the config's, else .explainer-cache].",
)
@click.option(
    "--trust-config",
    is_flag=True,
    help="The config is yours: its root, output and cache_dir may lie outside its folder, and its "
    "[backend] base_url may get your OPENAI_API_KEY.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Exit with 1 if an author's text is stale (its code changed since it was written), one line per "
    "piece: for CI. The files are written all the same.",
)
@verify_option("[translate] verify, else ")
def build(
    config_path: Path,
    only: tuple[str, ...],
    langs: tuple[str, ...],
    dry_run: bool,
    rerun_demos: bool,
    no_demos: bool,
    keep_source_on_failure: bool,
    backend: str | None,
    model: str | None,
    base_url: str | None,
    cache_dir: str | None,
    trust_config: bool,
    strict: bool,
    verify: str | None,
):
    """Explain, translate and render every post of a site in every language, running its demos.

    A site's config reads and writes only inside its own folder and never sends your API key to a
    server it names, unless you pass --trust-config. Demos are the site's code running on this
    machine: run them only for sites you trust, or pass --no-demos. They run from the project root
    with a clean environment (no keys or tokens), a deadline, and a cap on the output published.

    Only what changed is redone: answers and demo results are cached, and files whose bytes
    would not change are not rewritten. Files are written atomically, so an interrupted build
    leaves only whole files and the next one resumes from the cache.

    Edits to an explained post in the source language are kept, in explanations/<slug>.toml, and
    translated: see explainer review.
    """
    from explainer.progress import progress_for
    from explainer.site import BuildOptions, build_site
    from explainer.site_config import load_config, with_overrides

    if no_demos and rerun_demos:
        raise UserError("--no-demos runs no demo, so --rerun-demos can't rerun them; pass one of the two")
    config = with_overrides(
        load_config(config_path, trust=trust_config),
        backend=backend,
        model=model,
        base_url=base_url,
        cache_dir=cache_dir,
        verify=verify,
    )
    options = BuildOptions(
        only=only,
        languages=tuple(code.strip() for value in langs for code in value.split(",") if code.strip()),
        dry_run=dry_run,
        rerun_demos=rerun_demos,
        run_demos=not no_demos,
        keep_source_on_failure=keep_source_on_failure,
    )
    report = build_site(config, options, progress=progress_for(sys.stderr))  # Ctrl-C: see _OneLineErrors
    for path in report.planned if dry_run else report.written:
        click.echo(str(path))
    click.echo(("Dry run: " if dry_run else "") + report.summary(), err=True)
    stale = [f"{slug}: {problem}" for slug, problems in report.stale.items() for problem in problems] if strict else []
    for line in stale:
        click.echo(f"Error: {line}", err=True)
    if report.failed:
        raise UserError(
            f"{len(report.failed)} file(s) not written because a translation failed (listed above); "
            "rerun to ask again (answers that passed are cached), pass --keep-source-on-failure "
            "to publish them with the failed segments in the source language, or try another --model"
        )
    if stale:
        raise click.exceptions.Exit(1)


@main.command()
@click.argument("slug")
@config_option("The site's config.")
@click.option(
    "--accept",
    "accepted",
    multiple=True,
    metavar="ID",
    help="Accept this part as the post shows it: a piece's id, title, intro, or all; repeatable.",
)
@click.option("--trust-config", is_flag=True, help="The config is yours: as for explainer build.")
def review(slug: str, config_path: Path, accepted: tuple[str, ...], trust_config: bool):
    """List the parts of the explained post SLUG that no author has reviewed yet, each with its code and
    the text the post shows; --accept keeps a part's text as the author's.

    A part is reviewed once it holds the author's text: edited in the post (explainer build keeps the
    edit), or accepted here. Both go to explanations/SLUG.toml beside the config. A stale piece (its
    code changed since its text was written) is shown with the diff of its code. Once every part is
    reviewed, the next build writes reviewed: true in the post's front matter.

    \b
    Examples:
      explainer review llama-generate
      explainer review llama-generate --accept 3f2a9c0d1e2b --accept intro
      explainer review llama-generate --accept all
    """
    from explainer.edits import REVIEWED, open_review
    from explainer.site_config import load_config

    session = open_review(load_config(config_path, trust=trust_config), slug)
    if accepted:
        names = session.accept(accepted)
        click.echo(
            f"{slug}: accepted {len(names)} part(s) into {session.edits.path}; run explainer build to publish",
            err=True,
        )
        return
    items = session.items()
    pending = [item for item in items if item.state != REVIEWED]
    if pending:
        click.echo("\n\n".join(item.describe() for item in pending))
    click.echo(
        f"{slug}: {len(pending)} of {len(items)} part(s) not reviewed"
        + (
            f"; edit them in {session.published.path} and build, or accept them: "
            f"explainer review {slug} --accept ID (or all)"
            if pending
            else ""
        ),
        err=True,
    )


@main.command()
@click.option(
    "--model",
    metavar="NAME|PATH",
    help="A catalog name (python -m llama_ref --list-models) or a model file or folder: GGUF, "
    "Hugging Face, Meta or llama2.c [default: qwen2.5-coder-1.5b].",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; one other than loopback (0.0.0.0: your whole network) "
    "needs --api-key or EXPLAINER_API_KEY.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=2),
    metavar="N",
    help="Longest prompt + answer, in tokens; the KV cache is allocated for it [default: 4096].",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    metavar="N",
    help="Most requests generating at once; more wait for a free row [default: 8].",
)
@click.option(
    "--api-key",
    metavar="KEY",
    help="Require `Authorization: Bearer KEY` of every client [default: EXPLAINER_API_KEY, else no key].",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=8 << 20,
    show_default=True,
    help="Largest request body; a larger one gets 413 before it is read.",
)
def serve(
    model: str | None,
    host: str,
    port: int,
    max_seq_len: int | None,
    max_batch_size: int | None,
    api_key: str | None,
    max_body_bytes: int,
):
    """Serve the local model over an OpenAI-compatible API, until Ctrl-C.

    Endpoints: GET /v1/models, POST /v1/chat/completions and POST /v1/completions, streamed or
    not. Requests are batched continuously: each joins the running batch as soon as a row is free.
    The model's name in requests and responses is its catalog name, or its file name without the
    extension (GET /v1/models lists it).

    \b
    Examples:
      explainer serve --port 8000
      explainer explain run.c --base-url http://127.0.0.1:8000/v1 --model qwen2.5-coder-1.5b
    """
    from llama_ref.errors import LlamaRefError
    from llama_ref.serve import serve as serve_model

    try:
        serve_model(
            model,
            host,
            port,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            api_key=api_key,
            max_body_bytes=max_body_bytes,
        )
    except LlamaRefError as exc:
        raise UserError(str(exc)) from None
