"""`explainer build`: explainer.toml -> every post in every language -> files Jekyll publishes as they are.

Each post is made once in the source language (explained from code, or read from hand-written
Markdown with its demos run), then translated into each language, rendered, and written
atomically. Everything expensive goes through a cache: model answers (explainer.cache) and demo
results (explainer.demos), so a rebuild with nothing changed asks no model, runs no demo and,
since unchanged files are not rewritten, leaves every byte and mtime as it was.

The config is read by explainer.site_config; progress is shown by explainer.progress.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from explainer import frontmatter
from explainer.backends import (
    Backend,
    BackendSettings,
    UnusableAnswer,
    Usage,
    backend_kind,
    capabilities,
    default_backend_name,
    make_backend,
)
from explainer.demos import Demo, DemoRunner, demo_markdown, expand_demos
from explainer.errors import UserError
from explainer.fileio import check_inside, write_atomic
from explainer.languages import language
from explainer.markdown_segments import split_document
from explainer.progress import BuildProgress
from explainer.render import liquid_safe
from explainer.site_config import PostSpec, SiteConfig, check_key_destination, unready_languages
from explainer.waiting import wait_interruptibly

DEFAULT_API_JOBS = 4  # posts × languages in flight at once on an API backend
FAILURE_PREVIEW = 160  # characters of a failed language's first reason shown in the log as it fails


@dataclass(frozen=True)
class BuildOptions:
    only: tuple[str, ...] = ()  # post slugs; empty: all
    languages: tuple[str, ...] = ()  # empty: the config's
    dry_run: bool = False  # plan only: no model, no demo, no file
    rerun_demos: bool = False
    run_demos: bool = True  # False: demo blocks published as plain code, the config's demos left out
    keep_source_on_failure: bool = False  # a segment that fails every retry keeps its source text (listed)


@dataclass
class BuildReport:
    posts: int = 0
    languages: int = 0
    planned: list[Path] = field(default_factory=list)  # every file this build makes, in config order
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    demo_runs: int = 0
    demo_cache_hits: int = 0
    seconds: float = 0.0
    untranslated: dict[Path, list[str]] = field(default_factory=dict)  # file -> segments left in the source
    failed: dict[Path, str] = field(default_factory=dict)  # file not written -> why its translation failed
    # post slug -> one line per stale piece of it, and per author's text that fits no piece (explainer.edits)
    stale: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"{self.posts} post(s) × {self.languages} language(s): {len(self.written)} file(s) written, "
            f"{len(self.unchanged)} unchanged; {self.usage.requests} request(s), "
            f"{self.usage.cache_hits} cache hit(s), {self.usage.retried} segment(s) asked again; "
            f"{self.demo_runs} demo run(s), "
            f"{self.demo_cache_hits} from cache; {self.seconds:.1f} s"
        )
        for path, segments in self.untranslated.items():
            text += (
                f"\n{path}: {len(segments)} segment(s) left untranslated (listed in its front matter): "
                + " | ".join(segments)
            )
        for path, why in self.failed.items():
            text += f"\n{path}: not written, its translation failed: {why}"
        for slug, problems in self.stale.items():
            text += "".join(f"\n{slug}: {problem}" for problem in problems)
        return text


def unconfigured_api(settings: BackendSettings) -> str | None:
    """What an API backend lacks to be used here (no key and no server to send to), or None: it has what it
    needs, or it runs its model here."""
    name = settings.name or default_backend_name(settings.base_url)
    if "base_url" not in backend_kind(name).settings:  # not an API: its model runs here
        return None
    if settings.base_url or os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"):
        return None
    return "no API configured here (no OPENAI_API_KEY, OPENAI_BASE_URL or base_url in its table)"


class UnconfiguredBackend:
    """A language's own backend that cannot be made here (its API is not configured) while its table keeps the
    source text on failure: every request is unusable, so each segment the cache does not hold stays as it is."""

    def __init__(self, settings: BackendSettings, reason: str):
        self.name = settings.name or default_backend_name(settings.base_url)
        self.model = settings.model or "(not configured)"
        self.reason = reason

    def complete(self, requests, on_done=None):
        raise UnusableAnswer(self.reason, dict.fromkeys(range(len(requests)), self.reason))


def build_site(
    config: SiteConfig,
    options: BuildOptions = BuildOptions(),
    backend: Backend | None = None,
    progress: BuildProgress | None = None,
) -> BuildReport:
    """Build every post of `config` (or options.only) in every language; see the module docstring.
    `backend` defaults to make_backend(config.backend); a language routed elsewhere ([languages.<code>])
    gets make_backend of its own settings."""
    build = _Build(config, options, progress or BuildProgress())
    for line in unready_languages(config, build.languages, options.keep_source_on_failure):
        build.progress.say(f"warning: {line}")  # before any work: a long build would fail it at the end
    for lang in build.languages:  # a language's own API with nothing to send to: said before any work
        route, missing = config.routes.get(lang), build.unconfigured(lang)
        if route is None or route.backend is None or missing is None:
            continue
        table = f"[languages.{lang}] backend = {route.backend.name!r}"
        if not build.keeps_source(lang):
            raise UserError(
                f"{config.path.name}: {table} has {missing}: set OPENAI_API_KEY, give the table a base_url, add "
                f"keep_source_on_failure = true to keep its source text, or drop {lang} from [site] languages or --lang"
            )
        build.progress.say(
            f"warning: {lang}: {table} has {missing}; its pages keep the {config.source_lang} text, listed in "
            f"their front matter (untranslated:); configure one to translate {lang}"
        )
    if options.dry_run:
        return build.report
    if backend is None:
        check_key_destination(config)
    try:
        return build.run(backend or make_backend(config.backend))
    finally:
        build.progress.close()


@dataclass
class _Source:
    """A post in the source language, ready to translate: generated data or Markdown text."""

    post: object = None  # explainer.post.Post, for an explain target
    demos_markdown: str = ""  # an explain target's demos: each command and its output
    markdown: str | None = None  # a hand-written post, its demo outputs inserted


class _Build:
    """One run of `explainer build`: the plan, the shared backend and caches, the counters."""

    def __init__(self, config: SiteConfig, options: BuildOptions, progress: BuildProgress):
        self.config, self.options, self.progress = config, options, progress
        self.posts = self._chosen_posts()
        self.languages = [language(code).code for code in options.languages] or list(config.languages)
        self.report = BuildReport(
            posts=len(self.posts),
            languages=len(self.languages),
            planned=[config.post_path(post, lang) for post in self.posts for lang in self.languages],
        )
        self._lock = threading.Lock()

    def _chosen_posts(self) -> list[PostSpec]:
        slugs = [post.slug for post in self.config.posts]
        if unknown := [slug for slug in self.options.only if slug not in slugs]:
            raise UserError(
                f"--only {unknown[0]}: no such post in {self.config.path.name}; choose from {', '.join(slugs)}"
            )
        return [post for post in self.config.posts if not self.options.only or post.slug in self.options.only]

    def run(self, backend: Backend) -> BuildReport:
        from explainer.cache import Cache

        started = time.monotonic()
        # A site that is not trusted writes only inside its folder: posts, and a cache the file placed there.
        self.inside = None if self.config.trusted else self.config.path.parent.resolve()
        cache_inside = self.inside if "cache_dir" in self.config.from_file else None
        if self.inside is not None:  # refused before any model is asked, not at the first post written
            for path in self.report.planned:
                check_inside(path.parent, self.inside)
        self.backend, self.cache = backend, Cache(self.config.cache_dir, inside=cache_inside)
        self.routed: dict[str, Backend] = {}  # by language: the backends of [languages.<code>] tables, made once
        self.demos: DemoRunner | None = None  # --no-demos
        if self.options.run_demos:
            self.demos = DemoRunner(
                self.config.root,
                self.config.cache_dir,
                rerun=self.options.rerun_demos,
                timeout_s=self.config.demo_timeout,
                output_limit=self.config.demo_output_limit,
                inside=cache_inside,
            )
        for post in self.posts:
            self.progress.start(post.slug, 1 + len(self.languages))
        # The local model answers one batch at a time (it batches each call's requests itself);
        # an API takes several posts' requests at once.
        kind = capabilities(backend)
        local = kind is not None and kind.batches_locally
        local |= any(
            backend_kind(route.backend.name or default_backend_name(route.backend.base_url)).batches_locally
            for lang, route in self.config.routes.items()
            if route.backend is not None and lang in self.languages
        )
        jobs = 1 if local else self.config.jobs or DEFAULT_API_JOBS
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="explainer-build")
        try:
            # A post's languages start as soon as its source is ready, while other sources are made.
            sources: dict[Future, PostSpec] = {pool.submit(self.make_source, post): post for post in self.posts}
            pending = set(sources)
            while pending:
                done, pending = wait_interruptibly(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # a job's error stops the build
                    if future in sources:
                        pending |= {
                            pool.submit(self.write_variant, sources[future], result, lang) for lang in self.languages
                        }
        except BaseException:
            # A failed job or Ctrl-C: start nothing new. Files written are whole; answers are cached.
            if self.demos is not None:
                self.demos.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        order = {path: index for index, path in enumerate(self.report.planned)}
        self.report.written.sort(key=order.get)
        self.report.unchanged.sort(key=order.get)
        self.report.failed = dict(sorted(self.report.failed.items(), key=lambda item: order[item[0]]))
        if self.demos is not None:
            self.report.demo_runs, self.report.demo_cache_hits = self.demos.runs, self.demos.cache_hits
        self.report.seconds = time.monotonic() - started
        return self.report

    def make_source(self, post: PostSpec) -> _Source:
        usage = Usage()
        try:
            if post.markdown is not None:
                source = _Source(markdown=self.read_markdown(post))
            else:
                from explainer.edits import load_edits

                edits = load_edits(self.config.edits_path(post))  # its mistakes, before any model is asked
                generated = self.author_text(post, self.explain(post, usage), edits)
                commands = post.demos if self.demos is not None else ()  # --no-demos: left out
                demos = [
                    Demo(command, "sh", f"{self.config.path.name}: post {post.slug!r}, demo {number}")
                    for number, command in enumerate(commands, 1)
                ]
                if demos:
                    self.progress.status(post.slug, "running demos")
                source = _Source(
                    post=generated,
                    demos_markdown="\n".join(demo_markdown(demo, self.demos.run(demo)) for demo in demos),
                )
        except UserError as error:
            self.progress.status(post.slug, "failed")
            raise UserError(f"post {post.slug!r}: {error}") from None
        finally:
            self.add_usage(usage)
        self.progress.status(post.slug, "ready to translate", advance=1)
        return source

    def read_markdown(self, post: PostSpec) -> str:
        name = post.markdown.name
        try:
            text = post.markdown.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {post.markdown}: {exc}; save it as UTF-8") from None
        source_lang = language(self.config.source_lang)
        # Set once in the source: translations keep every key, and set their own lang and dir.
        text = frontmatter.update(
            text,
            name,
            {"lang": source_lang.code, "dir": source_lang.dir, "ref": post.slug},
            defaults={"layout": self.config.layout},
        )
        if self.demos is not None:
            self.progress.status(post.slug, "running demos")
        return expand_demos(text, self.demos, name)

    def explain(self, post: PostSpec, usage: Usage):
        from explainer.explain import explain_file

        def on_progress(done: int, total: int):
            self.progress.status(post.slug, f"explaining {post.file}", detail=f"{done}/{total}")

        generated, _ = explain_file(
            self.config.root / post.file,
            symbol=post.symbol,
            backend=self.backend,
            cache=self.cache,
            lang=self.config.source_lang,
            max_lines=post.max_lines,
            usage=usage,
            date=post.date,
            on_progress=on_progress,
            on_warning=lambda message: self.progress.say(f"warning: {message}"),
            display_path=Path(post.file).as_posix(),
        )  # as the config names it
        return generated

    def author_text(self, post: PostSpec, generated, edits):
        """The explained post with its author's text over the model's (explainer.edits): edits made in the
        source-language post since the last build are kept in its edits file before anything is written."""
        from explainer.edits import with_author_text

        authored = with_author_text(
            generated,
            edits,
            self.config.post_path(post, self.config.source_lang),
            markdown=True,
            label=f"post {post.slug!r}",
            inside=self.inside,
        )
        for warning in authored.warnings(post.slug, edits.path):
            self.progress.say(f"warning: {post.slug}: {warning}")
        if problems := authored.problems(post.slug, edits.path):
            with self._lock:
                self.report.stale[post.slug] = problems
        return authored.post

    def keeps_source(self, lang: str) -> bool:
        """Whether a segment of `lang` that fails every retry keeps its source text: the flag, or its table."""
        route = self.config.routes.get(lang)
        return self.options.keep_source_on_failure or (route is not None and route.keep_source_on_failure)

    def unconfigured(self, lang: str) -> str | None:
        """What the API of `lang`'s own table lacks here (unconfigured_api), or None (none lacking, or no table)."""
        route = self.config.routes.get(lang)
        return None if route is None or route.backend is None else unconfigured_api(route.backend)

    def backend_for(self, lang: str) -> Backend:
        """The backend that translates into `lang`: its own, if its [languages.<code>] table names one."""
        route = self.config.routes.get(lang)
        if route is None or route.backend is None:
            return self.backend
        with self._lock:
            if lang not in self.routed:
                if self.unconfigured(lang) is not None and self.keeps_source(lang):
                    # "to an API where one is configured, else kept in the source language": the pages are
                    # written, every segment not in the cache keeps its source text and is listed (build_site
                    # said so before any work)
                    self.routed[lang] = UnconfiguredBackend(route.backend, f"no API configured for [languages.{lang}]")
                else:
                    where = f"{self.config.path.name}: [languages.{lang}] backend"
                    self.routed[lang] = make_backend(route.backend, where)
            return self.routed[lang]

    def write_variant(self, post: PostSpec, source: _Source, lang: str) -> None:
        """Write one post in one language. A translation that fails its checks writes nothing for that
        language and is reported (BuildReport.failed); the other languages go on. Other errors stop the build."""
        from explainer.translate import TranslationFailed

        usage = Usage()
        path = self.config.post_path(post, lang)
        try:
            if lang != self.config.source_lang:
                self.progress.status(post.slug, f"translating to {lang}")
            kept: list[str] | None = [] if self.keeps_source(lang) else None
            text = (
                self.render_markdown(post, source.markdown, lang, usage, kept)
                if source.markdown is not None
                else self.render_generated(post, source, lang, usage, kept)
            )
        except TranslationFailed as error:
            # the first reason at once (a build runs for long), every segment in the summary at the end
            first = textwrap.shorten(str(error).split(" | ")[0], FAILURE_PREVIEW, placeholder=" …")
            self.progress.status(post.slug, f"{lang} failed: {first}", advance=1)
            with self._lock:
                self.report.failed[path] = str(error)
            return
        except UserError as error:
            self.progress.status(post.slug, f"{lang} failed")
            raise UserError(f"post {post.slug!r} in {lang}: {error}") from None
        finally:
            self.add_usage(usage)
        written = write_atomic(path, text, inside=self.inside)
        with self._lock:
            (self.report.written if written else self.report.unchanged).append(path)
            if kept:
                self.report.untranslated[path] = kept
        self.progress.status(post.slug, f"{lang} {'written' if written else 'unchanged'}", advance=1)

    def render_generated(
        self, post: PostSpec, source: _Source, lang: str, usage: Usage, untranslated: list[str] | None = None
    ) -> str:
        from explainer.render import render_post
        from explainer.translate import translate_post, untranslated_places

        generated, translated_by = source.post, None
        editable = lang == generated.lang  # the post its author edits: the source language's
        if not editable:
            generated = translate_post(
                generated, lang, self.backend_for(lang), self.cache, usage, untranslated, self.config.verify
            )
            translator = self.backend_for(lang)
            # a routed language's own model, not the explaining one; none where its API is not configured
            unconfigured = isinstance(translator, UnconfiguredBackend) and not usage.cache_hits
            translated_by = None if unconfigured else translator.model
        extra = {"layout": self.config.layout, "dir": language(lang).dir, "ref": post.slug}
        if untranslated:  # a reader can tell a page that mixes languages, and where
            extra["untranslated"] = untranslated_places(untranslated)
        return render_post(
            generated,
            translated_by=translated_by,
            extra_front_matter=extra,
            demos=source.demos_markdown,
            editable=editable,
        )

    def render_markdown(
        self, post: PostSpec, text: str, lang: str, usage: Usage, untranslated: list[str] | None = None
    ) -> str:
        from explainer.translate import translate_markdown

        if lang != self.config.source_lang:
            text = translate_markdown(
                text,
                lang,
                self.backend_for(lang),
                self.cache,
                usage,
                source_lang=self.config.source_lang,
                name=post.markdown.name,
                untranslated=untranslated,
                verify=self.config.verify,
            )
        # Jekyll runs Liquid over the body only; the front matter is YAML.
        rest = frontmatter.body(split_document(text))
        return text[: len(text) - len(rest)] + liquid_safe(rest)

    def add_usage(self, usage: Usage):
        with self._lock:
            total = self.report.usage
            total.requests += usage.requests
            total.cache_hits += usage.cache_hits
            total.tokens_in += usage.tokens_in
            total.tokens_out += usage.tokens_out
            total.retried += usage.retried
