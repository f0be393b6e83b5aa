"""explainer.toml: the site's schema, read and checked into a SiteConfig, and the overrides flags and the
environment apply over it. Every mistake in the file is one UserError naming the file, the table and
the key.

A site may be someone else's: a repository you cloned to build. Unless you pass --trust-config, its
explainer.toml reads and writes only inside its own folder (root, output, cache_dir and a model file,
with symlinks resolved, and nothing written through a symlink that leads out: explainer.site), and
the OPENAI_API_KEY of your environment goes only to a server that you named (--base-url or
OPENAI_BASE_URL), never to one that only the file names. Its demos are another matter: they run its
code (--no-demos runs none).
"""

from __future__ import annotations

import dataclasses
import os
import string
import sys
from dataclasses import dataclass, field
from datetime import date as Date
from pathlib import Path

from explainer.backends import BACKENDS, BackendSettings, backend_kind, default_backend_name
from explainer.demos import DEFAULT_OUTPUT_LIMIT, DEFAULT_TIMEOUT_S, checked_timeout
from explainer.errors import UserError
from explainer.languages import language

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PATTERN = "_posts/{lang}/{date}-{slug}-{lang}.md"  # the seed author's layout
PATTERN_FIELDS = {"lang", "slug", "date", "year", "month", "day"}
DEFAULT_CACHE_DIR = ".explainer-cache"  # beside explainer.toml, like Quarto's _freeze


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
class LanguageRoute:
    """[languages.<code>]: how one language is translated where it differs from the others."""

    backend: BackendSettings | None = None  # None: the site's [backend]
    keep_source_on_failure: bool = False  # as --keep-source-on-failure, for this language alone


# [translate] verify: the meaning checks (explainer.translate.VERIFY_CHOICES); unset, on where the model runs here
VERIFY_SETTINGS = {"round-trip": True, "none": False}


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
    demo_output_limit: int  # bytes of a demo's output published
    jobs: int | None  # None: DEFAULT_API_JOBS on an API backend, 1 on the local model
    backend: BackendSettings
    posts: tuple[PostSpec, ...]
    trusted: bool = False  # --trust-config: its paths may leave its folder, its base_url may get the key
    # the settings whose values only the file gave (no flag or environment variable): "base_url", "cache_dir"
    from_file: frozenset[str] = frozenset()
    verify: bool | None = None  # [translate] verify or --verify; None: on where the model runs here
    routes: dict[str, LanguageRoute] = field(default_factory=dict)  # [languages.<code>], by language code

    def backend_for(self, lang: str) -> BackendSettings:
        """The backend that translates into `lang`: its [languages.<code>] table's, else [backend]."""
        route = self.routes.get(lang)
        return route.backend if route is not None and route.backend is not None else self.backend

    def post_path(self, post: PostSpec, lang: str) -> Path:
        year, month, day = post.date.split("-")
        return self.output / self.pattern.format(
            lang=lang, slug=post.slug, date=post.date, year=year, month=month, day=day
        )

    def edits_path(self, post: PostSpec) -> Path:
        """Where the author's text of an explained post is kept: beside the config, committed with it."""
        from explainer.edits import edits_path

        return edits_path(self.path.parent, post.slug)


_SECTIONS = {
    "site": {
        "root",
        "output",
        "pattern",
        "source_lang",
        "languages",
        "layout",
        "cache_dir",
        "demo_timeout",
        "demo_output_limit",
        "jobs",
    },
    "backend": {"name", "model", "base_url", "concurrency", "batch_size"},
    "translate": {"verify"},
    "languages": {"backend", "model", "base_url", "concurrency", "batch_size", "keep_source_on_failure"},
    "posts": {"slug", "date", "markdown", "file", "symbol", "max_lines", "demos"},
}
# The keys of a [languages.<code>] table that choose its backend: BackendSettings' fields, `backend` for `name`.
_ROUTE_SETTINGS = ("model", "base_url", "concurrency", "batch_size")


def load_config(path: str | Path, *, trust: bool = False) -> SiteConfig:
    """Read and check explainer.toml. Paths in it are relative to its folder, except a post's
    `file`, which is relative to the project `root` (the code lives in the project). Unless `trust`,
    root, output, cache_dir and a local model file must be inside that folder, symlinks resolved."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"no config file {path}; write one (see examples/site/explainer.toml) or pass --config FILE"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None
    where = path.name
    for key in data:
        if key not in _SECTIONS:
            raise UserError(
                f"{where}: unknown section [{key}]; expected [site], [backend], [translate], "
                f"[languages.<code>] and [[posts]]"
            )
    site = _table(data, "site", where)
    backend = _table(data, "backend", where)
    folder = path.parent.resolve()

    source_lang = _language(_get(site, "source_lang", str, "en", where), f"{where}: [site] source_lang")
    languages = tuple(
        _language(code, f"{where}: [site] languages") for code in _get(site, "languages", list, [source_lang], where)
    )
    if len(set(languages)) != len(languages):
        raise UserError(f"{where}: [site] languages lists a language twice")
    pattern = _get(site, "pattern", str, DEFAULT_PATTERN, where)
    _check_pattern(pattern, where)
    jobs = _get(site, "jobs", int, None, where)
    demo_timeout = _get(site, "demo_timeout", (int, float), DEFAULT_TIMEOUT_S, where)
    demo_timeout = checked_timeout(demo_timeout, f"{where}: [site] demo_timeout = {demo_timeout!r}")
    demo_output_limit = _get(site, "demo_output_limit", int, DEFAULT_OUTPUT_LIMIT, where)
    if (jobs is not None and jobs < 1) or demo_output_limit <= 0:
        raise UserError(f"{where}: [site] jobs and demo_output_limit must be positive")

    settings = BackendSettings(
        name=_get(backend, "name", str, None, where),
        model=_get(backend, "model", str, None, where),
        base_url=_get(backend, "base_url", str, None, where),
        concurrency=_get(backend, "concurrency", int, None, where),
        batch_size=_get(backend, "batch_size", int, None, where),
    )
    if settings.name is not None:
        kind = backend_kind(settings.name, f"{where}: [backend] name")
        settings = _model_file(settings, kind.model_files, folder, f"{where}: [backend] model", trust)
    verify = _get(_table(data, "translate", where), "verify", str, None, where)
    if verify is not None and verify not in VERIFY_SETTINGS:
        raise UserError(
            f"{where}: [translate] verify = {verify!r}; write one of "
            + " or ".join(f'"{choice}"' for choice in VERIFY_SETTINGS)
        )
    routes = _routes(data, source_lang, languages, folder, where, trust)

    posts_data = data.get("posts", [])
    if not isinstance(posts_data, list) or not posts_data:
        raise UserError(f"{where}: no posts; add a [[posts]] table with `file` (and `symbol`) or `markdown`")
    root = _contained(_get(site, "root", str, ".", where), folder, f"{where}: [site] root", trust)
    posts = tuple(_post_spec(entry, index, root, folder, where) for index, entry in enumerate(posts_data, 1))
    slugs = [post.slug for post in posts]
    if duplicates := sorted({slug for slug in slugs if slugs.count(slug) > 1}):
        raise UserError(f"{where}: two posts have the slug {duplicates[0]!r}; give one of them another `slug`")

    return SiteConfig(
        path=path,
        root=root,
        output=_contained(_get(site, "output", str, ".", where), folder, f"{where}: [site] output", trust),
        pattern=pattern,
        source_lang=source_lang,
        languages=languages,
        layout=_get(site, "layout", str, "post", where),
        cache_dir=_contained(
            _get(site, "cache_dir", str, DEFAULT_CACHE_DIR, where), folder, f"{where}: [site] cache_dir", trust
        ),
        demo_timeout=demo_timeout,
        demo_output_limit=demo_output_limit,
        jobs=jobs,
        backend=settings,
        posts=posts,
        trusted=trust,
        from_file=frozenset({"cache_dir"} | ({"base_url"} if settings.base_url else set())),
        verify=None if verify is None else VERIFY_SETTINGS[verify],
        routes=routes,
    )


def _model_file(settings: BackendSettings, model_files: bool, folder: Path, where: str, trust: bool) -> BackendSettings:
    """`settings` with a model that is a file, not a catalog name, resolved relative to the config like other
    paths, for a backend whose model may be a file here."""
    if not model_files or not settings.model or settings.model in _catalog_names():
        return settings
    return dataclasses.replace(settings, model=str(_contained(settings.model, folder, where, trust)))


def _routes(
    data: dict, source_lang: str, languages: tuple[str, ...], folder: Path, where: str, trust: bool
) -> dict[str, LanguageRoute]:
    """[languages.<code>] tables: a backend of its own for a language (`backend` and its settings, as in
    [backend]), and keep_source_on_failure."""
    tables = data.get("languages", {})
    if not isinstance(tables, dict):
        raise UserError(
            f'{where}: [languages] must hold one table per language, like [languages.hi] backend = "openai"'
        )
    routes = {}
    for code, table in tables.items():
        at = f"{where}: [languages.{code}]"
        if not isinstance(table, dict):
            raise UserError(f'{at} must be a table, like [languages.{code}] then backend = "openai" on the next line')
        lang = _language(code, at)
        if lang == source_lang:
            raise UserError(f"{at}: {lang} is the source language, which is not translated; remove the table")
        if lang not in languages:
            raise UserError(f"{at}: {lang} is not in [site] languages; add it there, or remove the table")
        _check_keys(table, "languages", where, label=f"languages.{code}")
        name = _get(table, "backend", str, None, at)
        chosen = [key for key in _ROUTE_SETTINGS if key in table]
        settings = None
        if name is None and chosen:
            raise UserError(
                f"{at}: {chosen[0]} needs the backend it is for in the same table: "
                f"backend = {' or '.join(repr(known) for known in BACKENDS)}"
            )
        if name is not None:
            kind = backend_kind(name, f"{at} backend")
            for key in chosen:
                if key not in kind.settings:
                    users = " and ".join(other.name for other in BACKENDS.values() if key in other.settings)
                    raise UserError(f"{at}: {key} is for the {users} backend; leave it out with backend = {name!r}")
            settings = BackendSettings(
                name=name,
                model=_get(table, "model", str, None, at),
                base_url=_get(table, "base_url", str, None, at),
                concurrency=_get(table, "concurrency", int, None, at),
                batch_size=_get(table, "batch_size", int, None, at),
            )
            settings = _model_file(settings, kind.model_files, folder, f"{at} model", trust)
        keep = table.get("keep_source_on_failure", False)
        if not isinstance(keep, bool):
            raise UserError(f"{at}: keep_source_on_failure = {keep!r} should be true or false")
        routes[lang] = LanguageRoute(settings, keep)
    return routes


def _contained(value: str, folder: Path, where: str, trust: bool) -> Path:
    """`value`, a path relative to the config's folder, resolved; outside that folder only with trust."""
    path = (folder / value).resolve()
    if not trust and not _inside(path, folder):
        raise UserError(
            f"{where} = {value!r} is {path}, outside {folder}; a site's config reads and writes only "
            f"inside its own folder: pass --trust-config if this explainer.toml is yours"
        )
    return path


def _catalog_names() -> set[str]:
    from llama_ref.catalog import CATALOG  # no torch

    return set(CATALOG)


def with_overrides(
    config: SiteConfig,
    *,
    backend: str | None = None,
    model: str | None = None,
    base_url: str | None = None,
    cache_dir: str | None = None,
    verify: str | None = None,
) -> SiteConfig:
    """Apply command-line flags and the environment over the file: flag, then environment
    (OPENAI_BASE_URL, EXPLAINER_CACHE_DIR), then explainer.toml, then the default. The flags choose
    [backend]; a language's own [languages.<code>] backend is used as the file says."""
    settings, from_file = config.backend, set(config.from_file)
    if backend and backend != settings.name:
        settings = BackendSettings(name=backend)  # another backend: the file's model and server are not for it
        from_file.discard("base_url")
    name = settings.name or default_backend_name(base_url or settings.base_url)
    chosen_url = base_url or os.environ.get("OPENAI_BASE_URL")
    if "base_url" in backend_kind(name).settings and chosen_url:
        settings = dataclasses.replace(settings, base_url=chosen_url)
        from_file.discard("base_url")
    settings = dataclasses.replace(settings, model=model or settings.model)
    cache = cache_dir or os.environ.get("EXPLAINER_CACHE_DIR")
    if cache:
        from_file.discard("cache_dir")
    return dataclasses.replace(
        config,
        backend=settings,
        from_file=frozenset(from_file),
        cache_dir=Path(cache).expanduser().resolve() if cache else config.cache_dir,
        verify=config.verify if verify is None else VERIFY_SETTINGS[verify],
    )


def check_key_destination(config: SiteConfig) -> None:
    """Refuse to send the environment's OPENAI_API_KEY to a server that only the (untrusted) file names."""
    if config.trusted or not os.environ.get("OPENAI_API_KEY"):
        return
    for lang, route in config.routes.items():
        if (
            route.backend is not None
            and route.backend.base_url
            and "base_url" in backend_kind(route.backend.name).settings
        ):
            raise UserError(
                f"{config.path.name}: [languages.{lang}] base_url = {route.backend.base_url!r} would get your "
                f"OPENAI_API_KEY, and a site's config must not choose where your key goes: pass --trust-config if "
                f"this explainer.toml is yours, or remove that base_url"
            )
    if "base_url" not in config.from_file:
        return
    if "base_url" not in backend_kind(config.backend.name or default_backend_name(config.backend.base_url)).settings:
        return
    raise UserError(
        f"{config.path.name}: [backend] base_url = {config.backend.base_url!r} would get your "
        f"OPENAI_API_KEY, and a site's config must not choose where your key goes: name the server "
        f"yourself with --base-url (or OPENAI_BASE_URL), or pass --trust-config if this "
        f"explainer.toml is yours"
    )


def _language(code, where: str) -> str:
    if not isinstance(code, str):
        raise UserError(f'{where}: {code!r} is not a language code; write one like "zh"')
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


def _check_keys(table: dict, name: str, where: str, label: str | None = None):
    for key in table:
        if key not in _SECTIONS[name]:
            raise UserError(
                f"{where}: unknown key {key!r} in [{label or name}]; "
                f"expected one of {', '.join(sorted(_SECTIONS[name]))}"
            )


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
        raise UserError(
            f"{where}: pattern {pattern!r} is malformed ({exc}); write it like {DEFAULT_PATTERN!r}"
        ) from None
    if unknown := fields - PATTERN_FIELDS:
        raise UserError(
            f"{where}: pattern uses {{{sorted(unknown)[0]}}}; "
            f"use only {', '.join('{' + f + '}' for f in sorted(PATTERN_FIELDS))}"
        )
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise UserError(
            f"{where}: pattern {pattern!r} would write outside the site's output folder; "
            f"write a relative path without '..', like {DEFAULT_PATTERN!r}"
        )
    if not {"lang", "slug"} <= fields:
        raise UserError(
            f"{where}: pattern {pattern!r} must contain {{lang}} and {{slug}}, or posts would overwrite each other"
        )


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
        if not (_inside(markdown_path, folder) or _inside(markdown_path, root)):
            raise UserError(
                f"{where}: markdown file {markdown} is outside the site's folder and the project root; "
                f"keep posts inside them"
            )
        if not markdown_path.is_file():
            raise UserError(
                f"{where}: markdown file {markdown} does not exist (paths are relative to {folder.name}/); fix the path"
            )
        default_slug = markdown_path.stem
    else:
        if not _inside((root / file).resolve(), root):
            # its code would be sent to the model: only the project's own files are
            raise UserError(
                f"{where}: file {file} is outside the project root {root.name}/; explain files inside "
                f"[site] root, or move root"
            )
        if not (root / file).is_file():
            raise UserError(
                f"{where}: file {file} does not exist under the project root {root}; fix `file` or [site] root"
            )
        markdown_path = None
        symbol = _get(entry, "symbol", str, None, where)
        default_slug = (symbol or Path(file).stem).rsplit(".", 1)[-1]
    slug = _get(entry, "slug", str, _slugify(default_slug), where)
    if not slug or slug != _slugify(slug):
        raise UserError(
            f"{where}: slug {slug!r} should be lowercase letters, digits and hyphens, "
            f"like {_slugify(slug) or 'my-post'!r}"
        )
    post_date = entry.get("date")
    if isinstance(post_date, Date):  # TOML has a date type: date = 2023-08-17
        post_date = post_date.isoformat()
    try:
        # exactly YYYY-MM-DD: fromisoformat also takes "20240105", which would not name a file the same way
        if Date.fromisoformat(post_date).isoformat() != post_date:
            raise ValueError(post_date)
    except (ValueError, TypeError):
        raise UserError(
            f'{where} ({slug}) needs date = "YYYY-MM-DD" (it names the file, so it must not change between builds)'
        ) from None
    demos = _get(entry, "demos", list, [], where)
    if not all(isinstance(command, str) for command in demos):
        raise UserError(f"{where}: demos must be a list of shell commands (strings)")
    if demos and markdown is not None:
        raise UserError(f"{where}: a hand-written post marks its demos in the text (```sh demo); remove `demos`")
    return PostSpec(
        slug=slug,
        date=post_date,
        markdown=markdown_path,
        file=file,
        symbol=_get(entry, "symbol", str, None, where),
        max_lines=_get(entry, "max_lines", int, 30, where),
        demos=tuple(demos),
    )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _slugify(text: str) -> str:
    words = "".join(char.lower() if char.isascii() and char.isalnum() else " " for char in text).split()
    return "-".join(words)


def unready_languages(config: SiteConfig, languages: list[str], keep_source: bool = False) -> list[str]:
    """One line per local catalog model that this build would ask for a language it was measured not to
    translate (llama_ref.catalog: site_fails), naming the ways out; empty when there is none. A language that
    keeps its source text on failure (the flag, or its table) is left out: its failures are published, listed."""
    from llama_ref.catalog import CATALOG, DEFAULT_MODEL  # no torch

    failing: dict[str, list[str]] = {}
    for lang in languages:
        route = config.routes.get(lang)
        if lang == config.source_lang or keep_source or (route is not None and route.keep_source_on_failure):
            continue
        settings = config.backend_for(lang)
        if not backend_kind(settings.name or default_backend_name(settings.base_url)).model_files:
            continue  # an API's model is not in the catalog
        model = CATALOG.get(settings.model or DEFAULT_MODEL)
        if model is not None and model.translates_site(lang) is False:
            failing.setdefault(model.name, []).append(lang)
    lines = []
    for model, codes in failing.items():
        them = "them" if len(codes) > 1 else "it"
        lines.append(
            f"{model} failed the checks in {', '.join(codes)} when measured on the example site: expect {them} "
            f'to fail; route {them} to another backend ([languages.{codes[0]}] backend = "openai" in '
            f"{config.path.name}), pass --keep-source-on-failure, or drop {them} from [site] languages or --lang"
        )
    return lines
