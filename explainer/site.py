"""`explainer build`: explainer.toml -> every post in every language -> files Jekyll publishes as they are.

Each post is made once in the source language (explained from code, or read from hand-written
Markdown with its demos run), then translated into each language, rendered, and written
atomically. Everything expensive goes through a cache: model answers (explainer.cache) and demo
results (explainer.demos), so a rebuild with nothing changed asks no model, runs no demo and,
since unchanged files are not rewritten, leaves every byte and mtime as it was.
"""

from __future__ import annotations

import dataclasses
import os
import string
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import date as Date
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from explainer.backends import (Backend, BackendSettings, Usage, backend_kind, capabilities, default_backend_name,
                                make_backend)
from explainer.demos import DEFAULT_TIMEOUT_S, Demo, DemoRunner, demo_markdown, expand_demos
from explainer.errors import UserError
from explainer.fileio import write_atomic
from explainer.languages import language
from explainer.markdown_segments import split_document
from explainer.render import front_matter, liquid_safe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PATTERN = "_posts/{lang}/{date}-{slug}-{lang}.md"  # the seed author's layout
PATTERN_FIELDS = {"lang", "slug", "date", "year", "month", "day"}
DEFAULT_CACHE_DIR = ".explainer-cache"  # beside explainer.toml, like Quarto's _freeze
DEFAULT_API_JOBS = 4  # posts × languages in flight at once on an API backend


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PostSpec:
    slug: str
    date: str  # YYYY-MM-DD
    markdown: Path | None = None  # a hand-written post (absolute)
    file: str | None = None  # an explain target, relative to the project root
    symbol: str | None = None
    max_lines: int = 30
    demos: tuple[str, ...] = ()  # shell commands whose output follows an explained post


@dataclass(frozen=True)
class SiteConfig:
    path: Path  # the explainer.toml
    root: Path  # project root: explain targets are read and demos run from here
    output: Path  # the Jekyll site
    pattern: str
    source_lang: str
    languages: tuple[str, ...]
    layout: str
    cache_dir: Path
    demo_timeout: float
    jobs: int | None  # None: DEFAULT_API_JOBS on an API backend, 1 on the local model
    backend: BackendSettings
    posts: tuple[PostSpec, ...]

    def post_path(self, post: PostSpec, lang: str) -> Path:
        year, month, day = post.date.split("-")
        return self.output / self.pattern.format(lang=lang, slug=post.slug, date=post.date,
                                                 year=year, month=month, day=day)


_SECTIONS = {
    "site": {"root", "output", "pattern", "source_lang", "languages", "layout", "cache_dir", "demo_timeout", "jobs"},
    "backend": {"name", "model", "base_url", "concurrency", "batch_size"},
    "posts": {"slug", "date", "markdown", "file", "symbol", "max_lines", "demos"},
}


def load_config(path: str | Path) -> SiteConfig:
    """Read and check explainer.toml. Paths in it are relative to its folder, except a post's
    `file`, which is relative to the project `root` (the code lives in the project)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no config file {path}; write one (see examples/site/explainer.toml) "
                        f"or pass --config FILE") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    where = path.name
    for key in data:
        if key not in _SECTIONS:
            raise UserError(f"{where}: unknown section [{key}]; expected [site], [backend] and [[posts]]")
    site = _table(data, "site", where)
    backend = _table(data, "backend", where)
    folder = path.parent.resolve()

    source_lang = _language(_get(site, "source_lang", str, "en", where), f"{where}: [site] source_lang")
    languages = tuple(_language(code, f"{where}: [site] languages")
                      for code in _get(site, "languages", list, [source_lang], where))
    if len(set(languages)) != len(languages):
        raise UserError(f"{where}: [site] languages lists a language twice")
    pattern = _get(site, "pattern", str, DEFAULT_PATTERN, where)
    _check_pattern(pattern, where)
    jobs = _get(site, "jobs", int, None, where)
    demo_timeout = _get(site, "demo_timeout", (int, float), DEFAULT_TIMEOUT_S, where)
    if (jobs is not None and jobs < 1) or demo_timeout <= 0:
        raise UserError(f"{where}: [site] jobs and demo_timeout must be positive")

    settings = BackendSettings(
        name=_get(backend, "name", str, None, where),
        model=_get(backend, "model", str, None, where),
        base_url=_get(backend, "base_url", str, None, where),
        concurrency=_get(backend, "concurrency", int, None, where),
        batch_size=_get(backend, "batch_size", int, None, where))
    if settings.name is not None:
        kind = backend_kind(settings.name, f"{where}: [backend] name")
        if kind.model_files and settings.model and settings.model not in _catalog_names():
            # a model file, relative to the config like other paths
            settings = dataclasses.replace(settings, model=str((folder / settings.model).resolve()))

    posts_data = data.get("posts", [])
    if not isinstance(posts_data, list) or not posts_data:
        raise UserError(f"{where}: no posts; add a [[posts]] table with `file` (and `symbol`) or `markdown`")
    root = (folder / _get(site, "root", str, ".", where)).resolve()
    posts = tuple(_post_spec(entry, index, root, folder, where) for index, entry in enumerate(posts_data, 1))
    slugs = [post.slug for post in posts]
    if duplicates := sorted({slug for slug in slugs if slugs.count(slug) > 1}):
        raise UserError(f"{where}: two posts have the slug {duplicates[0]!r}; give one of them another `slug`")

    return SiteConfig(
        path=path, root=root, output=(folder / _get(site, "output", str, ".", where)).resolve(),
        pattern=pattern, source_lang=source_lang, languages=languages,
        layout=_get(site, "layout", str, "post", where),
        cache_dir=(folder / _get(site, "cache_dir", str, DEFAULT_CACHE_DIR, where)).resolve(),
        demo_timeout=float(demo_timeout), jobs=jobs, backend=settings, posts=posts)


def _catalog_names() -> set[str]:
    from llama_ref.catalog import CATALOG  # no torch

    return set(CATALOG)


def with_overrides(config: SiteConfig, *, backend: str | None = None, model: str | None = None,
                   base_url: str | None = None, cache_dir: str | None = None) -> SiteConfig:
    """Apply command-line flags and the environment over the file: flag, then environment
    (OPENAI_BASE_URL, EXPLAINER_CACHE_DIR), then explainer.toml, then the default."""
    settings = config.backend
    if backend and backend != settings.name:
        settings = BackendSettings(name=backend)  # another backend: the file's model is not for it
    settings = dataclasses.replace(settings, model=model or settings.model, base_url=base_url or settings.base_url)
    name = settings.name or default_backend_name(settings.base_url)
    if "base_url" in backend_kind(name).settings and not settings.base_url:
        settings = dataclasses.replace(settings, base_url=os.environ.get("OPENAI_BASE_URL"))
    cache = cache_dir or os.environ.get("EXPLAINER_CACHE_DIR")
    return dataclasses.replace(config, backend=settings,
                               cache_dir=Path(cache).expanduser().resolve() if cache else config.cache_dir)


def _language(code, where: str) -> str:
    if not isinstance(code, str):
        raise UserError(f"{where}: {code!r} is not a language code; write one like \"zh\"")
    try:
        return language(code).code
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def _table(data: dict, name: str, where: str) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise UserError(f"{where}: [{name}] must be a table")
    _check_keys(table, name, where)
    return table


def _check_keys(table: dict, name: str, where: str):
    for key in table:
        if key not in _SECTIONS[name]:
            raise UserError(f"{where}: unknown key {key!r} in [{name}]; expected one of "
                            f"{', '.join(sorted(_SECTIONS[name]))}")


def _get(table: dict, key: str, kind, default, where: str):
    value = table.get(key, default)
    if value is not default and not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{where}: {key} = {value!r} should be a {names}")
    return value


def _check_pattern(pattern: str, where: str):
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as exc:
        raise UserError(f"{where}: pattern {pattern!r} is malformed ({exc}); "
                        f"write it like {DEFAULT_PATTERN!r}") from None
    if unknown := fields - PATTERN_FIELDS:
        raise UserError(f"{where}: pattern uses {{{sorted(unknown)[0]}}}; "
                        f"use only {', '.join('{' + f + '}' for f in sorted(PATTERN_FIELDS))}")
    if not {"lang", "slug"} <= fields:
        raise UserError(f"{where}: pattern {pattern!r} must contain {{lang}} and {{slug}}, "
                        f"or posts would overwrite each other")


def _post_spec(entry, index: int, root: Path, folder: Path, where: str) -> PostSpec:
    where = f"{where}: post {index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where} must be a [[posts]] table")
    _check_keys(entry, "posts", where)
    markdown, file = _get(entry, "markdown", str, None, where), _get(entry, "file", str, None, where)
    if (markdown is None) == (file is None):
        raise UserError(f"{where} needs exactly one of `file` (code to explain) or `markdown` (a hand-written post)")
    if markdown is not None:
        markdown_path = (folder / markdown).resolve()
        if not markdown_path.is_file():
            raise UserError(f"{where}: markdown file {markdown} does not exist (paths are relative to "
                            f"{folder.name}/); fix the path")
        default_slug = markdown_path.stem
    else:
        if not (root / file).is_file():
            raise UserError(f"{where}: file {file} does not exist under the project root {root}; "
                            f"fix `file` or [site] root")
        markdown_path = None
        symbol = _get(entry, "symbol", str, None, where)
        default_slug = (symbol or Path(file).stem).rsplit(".", 1)[-1]
    slug = _get(entry, "slug", str, _slugify(default_slug), where)
    if not slug or slug != _slugify(slug):
        raise UserError(f"{where}: slug {slug!r} should be lowercase letters, digits and hyphens, "
                        f"like {_slugify(slug) or 'my-post'!r}")
    post_date = entry.get("date")
    if isinstance(post_date, Date):  # TOML has a date type: date = 2023-08-17
        post_date = post_date.isoformat()
    try:
        Date.fromisoformat(post_date if isinstance(post_date, str) else "")
    except ValueError:
        raise UserError(f"{where} ({slug}) needs date = \"YYYY-MM-DD\" (it names the file, so it must not "
                        f"change between builds)") from None
    demos = _get(entry, "demos", list, [], where)
    if not all(isinstance(command, str) for command in demos):
        raise UserError(f"{where}: demos must be a list of shell commands (strings)")
    if demos and markdown is not None:
        raise UserError(f"{where}: a hand-written post marks its demos in the text (```sh demo); remove `demos`")
    return PostSpec(slug=slug, date=post_date, markdown=markdown_path, file=file,
                    symbol=_get(entry, "symbol", str, None, where),
                    max_lines=_get(entry, "max_lines", int, 30, where), demos=tuple(demos))


def _slugify(text: str) -> str:
    words = "".join(char.lower() if char.isascii() and char.isalnum() else " " for char in text).split()
    return "-".join(words)


# ---------------------------------------------------------------------------------------------
# Progress: a bar per post on a terminal, plain lines otherwise (stderr)
# ---------------------------------------------------------------------------------------------

class BuildProgress:
    """Plain lines, one per step of each post: for logs and pipes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def start(self, slug: str, steps: int):
        pass

    def status(self, slug: str, text: str, advance: int = 0, detail: str = ""):
        """The post's current step; `detail` (like "3/17") changes too often for a log and
        shows on the terminal only."""
        with self._lock:
            if self._last.get(slug) == text:
                return
            self._last[slug] = text
        self.say(f"{slug}: {text}")

    def say(self, line: str):
        with self._lock:
            print(line, file=self.stream, flush=True)

    def close(self):
        pass


class RichBuildProgress(BuildProgress):
    """One bar per post with its current status, on a terminal; messages print above the bars."""

    def __init__(self, stream=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        super().__init__(stream)
        self._bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                              console=Console(file=self.stream))
        self._tasks: dict[str, int] = {}
        self._bars.start()

    def start(self, slug: str, steps: int):
        self._tasks[slug] = self._bars.add_task(slug, total=steps, status="queued")

    def status(self, slug: str, text: str, advance: int = 0, detail: str = ""):
        self._bars.update(self._tasks[slug], status=f"{text} {detail}".strip(), advance=advance)

    def say(self, line: str):
        self._bars.console.print(line, markup=False, highlight=False)

    def close(self):
        self._bars.stop()


def progress_for(stream=None) -> BuildProgress:
    stream = stream or sys.stderr
    return RichBuildProgress(stream) if stream.isatty() else BuildProgress(stream)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildOptions:
    only: tuple[str, ...] = ()  # post slugs; empty: all
    languages: tuple[str, ...] = ()  # empty: the config's
    dry_run: bool = False  # plan only: no model, no demo, no file
    rerun_demos: bool = False


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

    def summary(self) -> str:
        return (f"{self.posts} post(s) × {self.languages} language(s): {len(self.written)} file(s) written, "
                f"{len(self.unchanged)} unchanged; {self.usage.requests} request(s), "
                f"{self.usage.cache_hits} cache hit(s); {self.demo_runs} demo run(s), "
                f"{self.demo_cache_hits} from cache; {self.seconds:.1f} s")


def build_site(config: SiteConfig, options: BuildOptions = BuildOptions(), backend: Backend | None = None,
               progress: BuildProgress | None = None) -> BuildReport:
    """Build every post of `config` (or options.only) in every language; see the module docstring.
    `backend` defaults to make_backend(config.backend)."""
    build = _Build(config, options, progress or BuildProgress())
    if options.dry_run:
        return build.report
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
        self.report = BuildReport(posts=len(self.posts), languages=len(self.languages),
                                  planned=[config.post_path(post, lang) for post in self.posts
                                           for lang in self.languages])
        self._lock = threading.Lock()

    def _chosen_posts(self) -> list[PostSpec]:
        slugs = [post.slug for post in self.config.posts]
        if unknown := [slug for slug in self.options.only if slug not in slugs]:
            raise UserError(f"--only {unknown[0]}: no such post in {self.config.path.name}; "
                            f"choose from {', '.join(slugs)}")
        return [post for post in self.config.posts if not self.options.only or post.slug in self.options.only]

    def run(self, backend: Backend) -> BuildReport:
        from explainer.cache import Cache

        started = time.monotonic()
        self.backend, self.cache = backend, Cache(self.config.cache_dir)
        self.demos = DemoRunner(self.config.root, self.config.cache_dir, rerun=self.options.rerun_demos,
                                timeout_s=self.config.demo_timeout)
        for post in self.posts:
            self.progress.start(post.slug, 1 + len(self.languages))
        # The local model answers one batch at a time (it batches each call's requests itself);
        # an API takes several posts' requests at once.
        kind = capabilities(backend)
        jobs = 1 if kind is not None and kind.batches_locally else self.config.jobs or DEFAULT_API_JOBS
        pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="explainer-build")
        try:
            # A post's languages start as soon as its source is ready, while other sources are made.
            sources: dict[Future, PostSpec] = {pool.submit(self.make_source, post): post for post in self.posts}
            pending = set(sources)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    result = future.result()  # a job's error stops the build
                    if future in sources:
                        pending |= {pool.submit(self.write_variant, sources[future], result, lang)
                                    for lang in self.languages}
        except BaseException:
            # A failed job or Ctrl-C: start nothing new. Files written are whole; answers are cached.
            self.demos.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        order = {path: index for index, path in enumerate(self.report.planned)}
        self.report.written.sort(key=order.get)
        self.report.unchanged.sort(key=order.get)
        self.report.demo_runs, self.report.demo_cache_hits = self.demos.runs, self.demos.cache_hits
        self.report.seconds = time.monotonic() - started
        return self.report

    def make_source(self, post: PostSpec) -> _Source:
        usage = Usage()
        try:
            if post.markdown is not None:
                source = _Source(markdown=self.read_markdown(post))
            else:
                generated = self.explain(post, usage)
                demos = [Demo(command, "sh", f"{self.config.path.name}: post {post.slug!r}, demo {number}")
                         for number, command in enumerate(post.demos, 1)]
                if demos:
                    self.progress.status(post.slug, "running demos")
                source = _Source(post=generated, demos_markdown="\n".join(
                    demo_markdown(demo, self.demos.run(demo)) for demo in demos))
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
        text = _with_front_matter(text, name, {"lang": source_lang.code, "dir": source_lang.dir, "ref": post.slug},
                                  defaults={"layout": self.config.layout})
        self.progress.status(post.slug, "running demos")
        return expand_demos(text, self.demos, name)

    def explain(self, post: PostSpec, usage: Usage):
        from explainer.explain import explain_file

        def on_progress(done: int, total: int):
            self.progress.status(post.slug, f"explaining {post.file}", detail=f"{done}/{total}")

        generated, _ = explain_file(self.config.root / post.file, symbol=post.symbol, backend=self.backend,
                                    cache=self.cache, lang=self.config.source_lang, max_lines=post.max_lines,
                                    usage=usage, date=post.date, on_progress=on_progress,
                                    on_warning=lambda message: self.progress.say(f"warning: {message}"),
                                    display_path=Path(post.file).as_posix())  # as the config names it
        return generated

    def write_variant(self, post: PostSpec, source: _Source, lang: str) -> None:
        usage = Usage()
        try:
            if lang != self.config.source_lang:
                self.progress.status(post.slug, f"translating to {lang}")
            text = (self.render_markdown(post, source.markdown, lang, usage) if source.markdown is not None
                    else self.render_generated(post, source, lang, usage))
        except UserError as error:
            self.progress.status(post.slug, f"{lang} failed")
            raise UserError(f"post {post.slug!r} in {lang}: {error}") from None
        finally:
            self.add_usage(usage)
        path = self.config.post_path(post, lang)
        written = write_atomic(path, text)
        with self._lock:
            (self.report.written if written else self.report.unchanged).append(path)
        self.progress.status(post.slug, f"{lang} {'written' if written else 'unchanged'}", advance=1)

    def render_generated(self, post: PostSpec, source: _Source, lang: str, usage: Usage) -> str:
        from explainer.render import render_post
        from explainer.translate import translate_post

        generated, notice = source.post, ""
        ui = {**language("en").ui, **language(lang).ui}
        if lang != generated.lang:
            generated = translate_post(generated, lang, self.backend, self.cache, usage)
            notice = ui["translation_notice"].format(model=generated.model)
        page = render_post(generated, translation_notice=notice,
                           extra_front_matter={"layout": self.config.layout, "dir": language(lang).dir,
                                               "ref": post.slug})
        if source.demos_markdown:
            page = (f"{page.rstrip()}\n\n## {liquid_safe(ui['demo_output'], inline=True)}\n\n"
                    f"{liquid_safe(source.demos_markdown)}")
        return page

    def render_markdown(self, post: PostSpec, text: str, lang: str, usage: Usage) -> str:
        from explainer.translate import translate_markdown

        if lang != self.config.source_lang:
            text = translate_markdown(text, lang, self.backend, self.cache, usage,
                                      source_lang=self.config.source_lang, name=post.markdown.name)
        # Jekyll runs Liquid over the body only; the front matter is YAML.
        document = split_document(text)
        end = document.front_matter.end if document.front_matter else 0
        return text[:end] + liquid_safe(text[end:])

    def add_usage(self, usage: Usage):
        with self._lock:
            total = self.report.usage
            total.requests += usage.requests
            total.cache_hits += usage.cache_hits
            total.tokens_in += usage.tokens_in
            total.tokens_out += usage.tokens_out


def _with_front_matter(text: str, name: str, values: dict, defaults: dict) -> str:
    """`text` with `values` set in its front matter and `defaults` added where missing; the other
    keys keep their order and values. A post without front matter gets one."""
    document = split_document(text)
    try:
        data = YAML().load(document.front_matter.yaml) if document.front_matter else None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 2}" if mark is not None else ""  # +2: the --- line, 1-based
        raise UserError(f"{name}: the front matter is not valid YAML{where}; fix it") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{name}: the front matter is not a mapping of keys to values; fix it")
    for key, value in defaults.items():
        data.setdefault(key, value)
    data.update(values)
    body = document.source[document.front_matter.end if document.front_matter else 0:]
    return f"---\n{front_matter(data)}---\n{body}"
