"""Translate posts into other languages without ever sending code to a model.

Generated posts (explainer.post.Post) are translated as data: title, intro and each explanation.
The code of a section is never sent; the template puts it back from the source. Hand-written
Markdown posts are split by markdown_segments: only prose segments are sent, with placeholders
for everything protected, and the document is rebuilt from the source around the answers.

Segments go out as JSON objects, many to a request for an API and one to a request for the local
model (which runs requests side by side). Each request names its answer's shape (Request.json_answer):
the local model is held to it token by token, markers included; an API server gets a JSON schema.

Nothing is written until every answer has passed every check (translation_checks: placeholders intact,
no chatter, one line per segment, the same Markdown structure, a complete answer, the target language,
and for the whole document byte-identical code blocks and the same headings, lists, links and tables).
With verify (on by default where the model runs here), a translation must also mean what its source says
(translation_checks.meaning_problems): it keeps every name of the source (acronyms and identifiers, checked
first: a translation that leaves one out is asked again without a read-back), it is read back into the source
language by the same backend and scored against the source with chrF, and the words each link or emphasis
marks must be the source's marked words, by their translation alone (one request per distinct span) or by
the read-back.
The prose of a translated Markdown post then goes through
safe_markdown.escape_model_html, like everything else a model writes for the site. A request that
fails is split and retried in smaller pieces, down to single segments, and a single segment is asked
again, varied, up to SEGMENT_RETRIES times; a segment that still fails makes the whole translation
fail, with a report, and nothing is written (or, when asked, keeps its source text and is listed).
Answers that passed are cached per segment, so a rerun pays only for what failed, and editing one
paragraph re-translates only that paragraph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml.comments import CommentedMap

from explainer import frontmatter
from explainer.backends import Backend, Completion, JsonAnswer, Request, UnusableAnswer, Usage, capabilities
from explainer.cache import Cache, complete_cached, key_for
from explainer.errors import UserError
from explainer.fileio import write_atomic
from explainer.languages import Language, known_languages, language
from explainer.markdown_segments import (
    PLACEHOLDER_END,
    PLACEHOLDER_START,
    Segment,
    UnreadableMarkdown,
    placeholder_numbers,
    split_document,
    strip_placeholders,
)
from explainer.post import Post
from explainer.safe_markdown import escape_model_html
from explainer.translation_checks import (
    LOOKALIKE_BRACKETS,
    checked_answer,
    detect_lang,
    document_problems,
    marked_words,
    meaning_problems,
    names_alone,
    names_problem,
    quote,
    repair_emphasis,
    repair_placeholders,
    segment_problems,
)

log = logging.getLogger(__name__)

# Front matter keys whose values are prose; every other key is copied as it is.
TRANSLATED_FRONT_MATTER_KEYS = ("title", "description", "excerpt")
MAX_SEGMENTS_PER_REQUEST = 20
MAX_CHARS_PER_REQUEST = 2000
# A model that runs here answers a call's requests side by side, one row each, at about the cost of one,
# and its prefix cache makes the shared system prompt free after the first. So each segment is a request
# of its own: every row is busy, a failure costs one segment, and a small model cannot slide one answer
# into the next segment's place, as it does in a batch (Qwen2.5-Coder-1.5B skipped a short heading).
LOCAL_SEGMENTS_PER_REQUEST = 1
# A segment that fails even alone is asked again this many times, each time with another seed, some
# sampling and a firmer prompt, before its language fails: small models drop a marker now and then.
SEGMENT_RETRIES = 3
RETRY_TEMPERATURE = 0.4
FIRMER = (
    "\nYour earlier answer for this segment was rejected. Check before you answer: every marker of the "
    "segment (⟦1⟧, ⟦2⟧, ...) appears exactly once in your translation, written exactly as in the "
    "segment, around the same words; the translation says what the segment says, with no word, question "
    "or formatting added and nothing left out; names (acronyms such as NVIDIA or GPU, and identifiers) are "
    "written exactly as in the segment; and you answer with the JSON object only."
)
# The meaning checks (translation_checks.meaning_problems): "round-trip" reads each translation back into the
# source language with the same backend, and translates the words a link or emphasis marks alone; "none" skips
# them. They cost a second request per segment, so they are on by default only where the model runs here:
# a small model's translation passes the structure checks and still says something else.
VERIFY_CHOICES = ("round-trip", "none")


class TranslationFailed(UserError):
    """A translation did not pass its checks; nothing was written."""


# ---------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------


def _system_prompt(lang: Language, literal: bool = False) -> str:
    """The instructions for translating into `lang`; `literal` for reading a translation back, where a
    paraphrase would hide what a translation changed and make a faithful one look changed."""
    terms = "; ".join(
        f"{term} → {rendering}" if term != rendering else f"{term} (keep as is)"
        for term, rendering in sorted(lang.glossary.items())
    )
    return (
        f"You translate the prose of a technical blog post into {lang.english_name} ({lang.name}).\n"
        "The user sends a JSON object whose values are text segments. Answer with one JSON object "
        "with exactly the same keys, each value the translation of that segment, and nothing else: "
        "no notes, no explanations, no code fences.\n"
        "Rules:\n"
        "- Markers such as ⟦1⟧ stand for code, links and formatting. Copy every marker exactly once, "
        "unchanged, to where it belongs in the translated sentence. Never add markers.\n"
        "- Keep each segment on one line. Keep Markdown emphasis (*, **, _) around the same words.\n"
        "- Do not add code, do not repeat code, do not comment on the translation.\n"
        f"- Glossary, always write these terms this way: {terms}."
        + (
            "\n- Translate literally: keep the words and their order as close to the text as the language allows."
            if literal
            else ""
        )
    )


# ---------------------------------------------------------------------------------------------
# Sending segments in batches, retrying smaller
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    where: str  # for reports: "post.md line 12", "title"
    segment: Segment
    key: str  # cache key of this segment's translation


def _parse_answer(text: str, count: int) -> tuple[dict[int, str], str | None]:
    """The translations in a batch answer, by 1-based id, and what is wrong with the answer as a
    whole (None if nothing). A ```json fence around the object is tolerated: it carries no text."""
    body = text.strip()
    if body.startswith("```json") and body.endswith("```"):
        body = body[len("```json") : -3].strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return {}, f"the answer is not a JSON object (it starts {quote(body)})"
    if not isinstance(data, dict):
        return {}, "the answer is not a JSON object"
    found = {
        int(key): value
        for key, value in data.items()
        if isinstance(key, str) and key.isdigit() and 1 <= int(key) <= count and isinstance(value, str)
    }
    return found, None


class SegmentTranslator:
    """Translates prose segments into one language through a backend, checked and cached per segment."""

    def __init__(
        self,
        lang: Language,
        backend: Backend,
        cache: Cache | None,
        usage: Usage,
        source_lang: str,
        keep_source: bool = False,
        verify: bool | None = None,
    ):
        self.lang, self.backend, self.cache, self.usage = lang, backend, cache, usage
        self.source_lang = source_lang
        self.system_prompt = _system_prompt(lang)
        self.keep_source = keep_source
        kind = capabilities(backend)
        self.segments_per_request = (
            LOCAL_SEGMENTS_PER_REQUEST if kind is not None and kind.batches_locally else MAX_SEGMENTS_PER_REQUEST
        )
        self.verify = verifies_by_default(backend) if verify is None else verify
        self.untranslated: list[str] = []  # with keep_source: the failed segments (where, what failed)
        self._attempts: dict[str, int] = {}  # by key: how often a segment was asked again alone
        self._retried: set[str] = set()  # keys of the segments asked again (Usage.retried)
        self._alone: dict[str, str] = {}  # marked source words -> their translation alone (meaning checks)

    def key(self, segment: Segment) -> str:
        """One cache entry per segment, whatever batch it travelled in."""
        messages = ({"role": "system", "content": self.system_prompt}, {"role": "user", "content": segment.text})
        return key_for(self.backend, Request(messages=messages), template_text="translate-segment")

    def translate(self, jobs: list[_Job]) -> list[str]:
        """Checked translations (placeholders still in) for `jobs`, in order. Raises
        TranslationFailed naming every segment that failed even alone; with keep_source, such a
        segment keeps its source text instead and is listed in self.untranslated."""
        done: dict[str, str] = {}  # by key: identical segments are translated once
        # by key: what passed every check but the meaning checks, which run on all of it at once
        # (job, translation, whether it came in a batch of several)
        unverified: dict[str, tuple[_Job, str, bool]] = {}
        for job in jobs:
            seen = job.key in done or job.key in unverified
            hit = self.cache.get(job.key) if self.cache is not None and not seen else None
            # checked again: a check added since the answer was cached (a Hindi word that mixes scripts) applies
            # to it too, and a cached answer that fails one is asked again like a new one
            if hit is not None and not segment_problems(job.segment, hit.text, self.lang, self.source_lang):
                self.usage.cache_hits += 1
                self._passed(job, hit.text, done, unverified, batched=False, cache=False)
        todo = list({job.key: job for job in jobs if job.key not in done and job.key not in unverified}.values())
        failures: dict[str, str] = {}
        self._attempts = {}
        batches = _batches(todo, self.segments_per_request)
        while batches or unverified:
            retry: list[list[_Job]] = []

            def take(index: int, answer: Completion | None, error: str | None, batches=batches, retry=retry) -> None:
                # as each answer arrives: what passed is cached at once (or, with verify, once its meaning
                # is checked), so an interrupted run keeps it
                retry.extend(self._take(batches[index], answer, error, done, unverified, failures))

            if batches:
                self._send(batches, take)
            if unverified:
                retry += self._verify(unverified, done, failures)
            batches = retry
        unique = list({job.key: job for job in jobs}.values())  # top to bottom
        if failures and self.keep_source:
            for job in unique:
                if job.key in failures:
                    done[job.key] = job.segment.text
                    self.untranslated.append(failures[job.key])
        elif failures:
            report = [failures[job.key] for job in unique if job.key in failures]
            more = f" | and {len(report) - 5} more" if len(report) > 5 else ""
            raise TranslationFailed(
                f"{len(report)} segment(s) failed even when sent alone: " + " | ".join(report[:5]) + more
            )
        return [done[job.key] for job in jobs]

    def _passed(
        self, job: _Job, translation: str, done: dict[str, str], unverified: dict, batched: bool, cache: bool = True
    ) -> None:
        """A translation passed every check but the meaning checks: kept (and cached), or, with verify, held
        for them."""
        if self.verify:
            unverified[job.key] = (job, translation, batched)
            return
        done[job.key] = translation
        if cache and self.cache is not None:
            self.cache.put(job.key, Completion(translation, "stop"))

    def _take(
        self,
        batch: list[_Job],
        answer: Completion | None,
        error: str | None,
        done: dict[str, str],
        unverified: dict,
        failures: dict[str, str],
    ) -> list[list[_Job]]:
        """Keep (and cache) what passed, note what failed alone; return the smaller units to retry."""
        translations, error = _parse_answer(answer.text, len(batch)) if error is None else ({}, error)
        if error is not None:
            if len(batch) == 1:
                return self._again_or_fail(batch[0], error, failures)
            return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        retry = []
        for number, job in enumerate(batch, 1):
            translation = repair_emphasis(
                job.segment, repair_placeholders(translations.get(number, ""), len(job.segment.protected))
            )
            problems = (
                segment_problems(job.segment, translation, self.lang, self.source_lang)
                if number in translations
                else ["missing from the answer"]
            )
            if not problems:
                self._passed(job, translation.strip(), done, unverified, batched=len(batch) > 1)
            else:
                retry += self._problem(job, problems, translation, len(batch) > 1, failures)
        return retry

    def _verify(self, unverified: dict, done: dict[str, str], failures: dict[str, str]) -> list[list[_Job]]:
        """The meaning checks, for every translation in `unverified` at once: each read back into the source
        language, and the source's marked words translated alone (once each), in one call, so the local model
        runs them side by side. What passes is kept and cached; what fails is asked again like any failed
        segment. Read-backs and marked words are cached as answers of their own."""
        checking = list(unverified.values())
        unverified.clear()
        # a translation that leaves out a name fails without a read-back: that request is saved
        unnamed = {job.key: names_problem(job.segment, translation) for job, translation, _ in checking}
        retry = [
            self._problem(job, [unnamed[job.key]], translation, batched, failures)
            for job, translation, batched in checking
            if unnamed[job.key]
        ]
        checking = [entry for entry in checking if not unnamed[entry[0].key]]
        words = sorted(
            {
                marked
                for job, *_ in checking
                for _, marked in marked_words(job.segment.text, job.segment.pairs)
                if marked not in self._alone and any(char.isalpha() for char in strip_placeholders(marked))
            }
        )
        # a segment of names alone has nothing to read back: the names check has judged it
        reading = [index for index, (job, _, _) in enumerate(checking) if not names_alone(job.segment)]
        requests = [
            read_back_request(checking[index][1], checking[index][0].segment.pairs, self.source_lang)
            for index in reading
        ]
        requests += [marked_words_request(marked, self.lang.code) for marked in words]
        answers: dict[int, str] = {}

        def arrived(index: int, completion: Completion) -> None:
            answers[index] = single_answer(completion.text)

        try:
            complete_cached(self.backend, requests, self.cache, self.usage, on_done=arrived)
        except UnusableAnswer:
            pass  # a read-back cut off or empty reads as nothing: that translation is asked again
        for index, marked in enumerate(words, len(reading)):
            self._alone[marked] = answers.get(index, "")
        backs = {index: answers.get(request, "") for request, index in enumerate(reading)}
        for index, (job, translation, batched) in enumerate(checking):
            problems = meaning_problems(job.segment, translation, backs.get(index), self._alone, self.source_lang)
            if not problems:
                done[job.key] = translation
                if self.cache is not None:
                    self.cache.put(job.key, Completion(translation, "stop"))
            else:
                retry.append(self._problem(job, problems, translation, batched, failures))
        return [batch for batches in retry for batch in batches]

    def _problem(
        self, job: _Job, problems: list, translation: str, batched: bool, failures: dict[str, str]
    ) -> list[list[_Job]]:
        """A translation that failed a check: asked again alone if it came in a batch (the smaller unit first),
        else again or failed."""
        if batched:
            self._asked_again(job)
            return [[job]]
        return self._again_or_fail(job, f"{'; '.join(problems)} (got {quote(translation)})", failures)

    def _asked_again(self, job: _Job) -> None:
        """Count a segment asked again after its answer failed a check, once however often (Usage.retried)."""
        if job.key not in self._retried:
            self._retried.add(job.key)
            self.usage.retried += 1

    def _again_or_fail(self, job: _Job, problem: str, failures: dict[str, str]) -> list[list[_Job]]:
        """A segment that failed alone: ask again, varied, while retries are left; then record why."""
        attempt = self._attempts.get(job.key, 0)
        if attempt < SEGMENT_RETRIES:
            self._attempts[job.key] = attempt + 1
            self._asked_again(job)
            return [[job]]
        tries = f" (asked {attempt + 1} times)" if attempt else ""
        failures[job.key] = f"{job.where}: {problem}{tries}"
        return []

    def _request(self, batch: list[_Job]) -> Request:
        attempt = self._attempts.get(batch[0].key, 0) if len(batch) == 1 else 0
        # A retry varies: another seed, some sampling, and a firmer prompt.
        return _json_request(
            self.system_prompt + (FIRMER if attempt else ""),
            [(job.segment.text, job.segment.pairs) for job in batch],
            temperature=RETRY_TEMPERATURE if attempt else 0.0,
            seed=attempt,
        )

    def _send(self, batches: list[list[_Job]], take: Callable[[int, Completion | None, str | None], None]) -> None:
        """Send one request per batch and call take(index, completion, None), or take(index, None, what
        went wrong), for each, as its answer arrives. By the backends' error contract an unusable answer
        (cut off, empty, no room in the context) is raised only after every other one has arrived, so
        the requests left unanswered then are exactly the unusable ones. A backend that cannot be reached
        fails the whole run."""
        requests = [self._request(batch) for batch in batches]
        answered: set[int] = set()

        def arrived(index: int, completion: Completion) -> None:
            answered.add(index)
            take(index, *checked_answer(completion))

        try:
            complete_cached(self.backend, requests, None, self.usage, on_done=arrived)
        except UnusableAnswer as error:
            for index in range(len(requests)):
                if index not in answered:
                    take(index, None, error.reasons.get(index, str(error)))


def verifies_by_default(backend: Backend) -> bool:
    """Whether the meaning checks run when no setting says: where the model runs here (VERIFY_CHOICES)."""
    kind = capabilities(backend)
    return kind is not None and kind.batches_locally


def read_back_request(translation: str, pairs: tuple[tuple[int, int], ...], source_lang: str) -> Request:
    """The request that reads `translation` (markers in; `pairs`: its links' markers, as in its Segment) back
    into `source_lang`, literally, for the round trip; its answer's text is single_answer(completion.text)."""
    return _json_request(_system_prompt(language(source_lang), literal=True), [(translation, pairs)])


def marked_words_request(words: str, target: str) -> Request:
    """The request that translates words a link or emphasis marks in a source segment into `target` by
    themselves, for the marked-words check; its answer's text is single_answer(completion.text)."""
    return _json_request(_system_prompt(language(target)), [(words, ())])


def single_answer(text: str) -> str:
    """The one value of an answer to a one-text request ("" when the answer is not that object)."""
    return _parse_answer(text, 1)[0].get(1, "")


def _json_request(
    system: str, items: list[tuple[str, tuple[tuple[int, int], ...]]], temperature: float = 0.0, seed: int = 0
) -> Request:
    """A request for one JSON object: the texts of `items` by ids "1", "2", ..., and an answer of the same shape,
    each value holding its text's markers exactly once (a link's pair of markers in its order). The local model
    is held to that token by token; an API server, to the keys where it takes a schema."""
    payload = json.dumps({str(number): text for number, (text, _) in enumerate(items, 1)}, ensure_ascii=False, indent=0)
    shape = JsonAnswer(
        keys=tuple(str(number) for number in range(1, len(items) + 1)),
        markers=tuple(tuple(str(n) for n in sorted(set(placeholder_numbers(text) or ()))) for text, _ in items),
        opener=PLACEHOLDER_START,
        closer=PLACEHOLDER_END,
        pairs=tuple(tuple((str(a), str(b)) for a, b in pairs) for _, pairs in items),
        forbidden="".join(char for char in LOOKALIKE_BRACKETS if not any(char in text for text, _ in items)) or None,
    )
    return Request(
        messages=({"role": "system", "content": system}, {"role": "user", "content": payload}),
        # Scripts differ a lot in tokens per character; leave room for the longest of them.
        max_tokens=min(4096, 256 + 3 * len(payload)),
        temperature=temperature,
        seed=seed,
        json_answer=shape,
    )


def _batches(jobs: list[_Job], max_segments: int) -> list[list[_Job]]:
    batches, size = [], 0
    for job in jobs:
        if not batches or len(batches[-1]) >= max_segments or size + len(job.segment.text) > MAX_CHARS_PER_REQUEST:
            batches.append([])
            size = 0
        batches[-1].append(job)
        size += len(job.segment.text)
    return batches


# ---------------------------------------------------------------------------------------------
# Documents: Markdown texts, generated posts, Markdown files
# ---------------------------------------------------------------------------------------------


def translate_texts(
    texts: dict[str, str],
    target: str,
    backend: Backend,
    cache: Cache | None = None,
    usage: Usage | None = None,
    source_lang: str = "en",
    published_as_markdown: Collection[str] = (),
    untranslated: list[str] | None = None,
    verify: bool | None = None,
) -> dict[str, str]:
    """Translate several Markdown texts, named for reports, into `target` in one go.

    Each comes back with its code, links and structure as in the source; raises TranslationFailed
    (a UserError) if any answer fails its checks even when retried alone. A translation cannot add
    raw HTML (the structure checks refuse it); in the texts named in published_as_markdown, what
    the model wrote also goes through safe_markdown.escape_model_html, for what only kramdown
    would make live (a javascript: link), while the source's own pieces, its HTML included, are
    restored as they are.

    With an `untranslated` list, a segment that fails every retry keeps its source text instead of
    failing the language, and the list gets one entry per such segment: where it is and what failed.

    `verify` runs the meaning checks (VERIFY_CHOICES) on every translation; None: verifies_by_default(backend).
    """
    lang = language(target)
    translator = SegmentTranslator(
        lang, backend, cache, usage or Usage(), source_lang, keep_source=untranslated is not None, verify=verify
    )
    documents = {name: _split(text, name) for name, text in texts.items()}
    jobs, owners = [], []
    for name, document in documents.items():
        if document.unmapped_lines:
            log.warning(
                "%s: prose at line(s) %s stays untranslated: markdown-it's text could not be located "
                "in the source (tabs in indentation, or escaped | in a table)",
                name,
                ", ".join(map(str, document.unmapped_lines)),
            )
        for index, segment in enumerate(document.segments):
            if segment.translatable:
                where = f"{name} line {segment.line}" if "\n" in document.source.strip() else name
                jobs.append(_Job(where, segment, translator.key(segment)))
                owners.append((name, index))
    translated: dict[str, dict[int, str]] = {name: {} for name in documents}
    for (name, index), job, text in zip(owners, jobs, translator.translate(jobs)):
        translated[name][index] = job.segment.restore(
            escape_model_html(text) if name in published_as_markdown else text
        )
    results, failures = {}, []
    for name, document in documents.items():
        results[name] = document.rebuild(translated[name])
        failures += [f"{name}: {problem}" for problem in document_problems(document.source, results[name])]
    if failures:
        raise TranslationFailed("the translated document does not match the source: " + " | ".join(failures))
    if untranslated is not None:
        untranslated += translator.untranslated
    return results


def _split(text: str, name: str):
    try:
        return split_document(text)
    except UnreadableMarkdown as exc:
        raise UserError(f"{name}: {exc}") from None


def untranslated_places(entries: list[str]) -> list[str]:
    """Where each segment that kept its source text is ("post.md line 12"), for a page's front matter;
    `entries` as translate_texts lists them ("where: what failed")."""
    return [entry.split(": ", 1)[0] for entry in entries]


def translate_post(
    post: Post,
    target: str,
    backend: Backend,
    cache: Cache | None = None,
    usage: Usage | None = None,
    untranslated: list[str] | None = None,
    verify: bool | None = None,
) -> Post:
    """The post in `target`: title, intro and explanations translated, code untouched (never sent).
    The author's parts (explainer.edits) are translated from the author's text and stay the author's:
    what the model wrote in them is escaped here, the author's own pieces restored as written.
    untranslated and verify: as for translate_texts."""
    texts = {"title": post.title, "intro": post.intro}
    texts.update(
        {f"section {number} explanation": section.explanation for number, section in enumerate(post.sections, 1)}
    )
    authored = {"title"} if post.title_authored else set()
    authored |= {"intro"} if post.intro_authored else set()
    authored |= {f"section {n} explanation" for n, section in enumerate(post.sections, 1) if section.authored}
    done = translate_texts(
        {name: text for name, text in texts.items() if text.strip()},
        target,
        backend,
        cache,
        usage,
        source_lang=post.lang,
        published_as_markdown=authored,
        untranslated=untranslated,
        verify=verify,
    )
    sections = [
        # what was left out of the source post is not part of it: not translated, not carried
        dataclasses.replace(
            section, explanation=done.get(f"section {number} explanation", section.explanation), left_out=""
        )
        for number, section in enumerate(post.sections, 1)
    ]
    return dataclasses.replace(
        post,
        lang=language(target).code,
        title=done.get("title", post.title),
        intro=done.get("intro", post.intro),
        intro_left_out="",
        sections=sections,
    )


def markdown_lang(text: str, name: str = "post") -> str:
    """The code of the language a Markdown post is written in: its front matter's `lang`, else detected."""
    document = _split(text, name)
    data = frontmatter.read(document, name)
    if data is not None and isinstance(data.get("lang"), str):
        return language(data["lang"]).code
    prose = " ".join(strip_placeholders(segment.text) for segment in document.segments)
    detected = detect_lang(prose)
    return next((code for code in known_languages() if code == detected), "en")


def front_matter_prose_keys(data) -> list[str]:
    """The keys of a post's front matter (`data`, None for none) whose prose is translated, in
    TRANSLATED_FRONT_MATTER_KEYS order: those that hold some text."""
    return [
        key
        for key in TRANSLATED_FRONT_MATTER_KEYS
        if data is not None and isinstance(data.get(key), str) and data[key].strip()
    ]


def translate_markdown(
    text: str,
    target: str,
    backend: Backend,
    cache: Cache | None = None,
    usage: Usage | None = None,
    source_lang: str | None = None,
    name: str = "post",
    untranslated: list[str] | None = None,
    verify: bool | None = None,
) -> str:
    """A hand-written Markdown post in `target`. Code, URLs, HTML, math and Liquid are copied from
    the source; the front matter keeps every key and its order, gets its title, description and
    excerpt translated, and records lang, dir, translated: true and the source's hash.
    untranslated: as for translate_texts; the front matter then lists those segments (untranslated:).
    verify: as for translate_texts."""
    lang = language(target)
    source_lang = language(source_lang).code if source_lang else markdown_lang(text, name)
    if source_lang == lang.code:
        raise UserError(f"{name} is already in {lang.code}; pick another language with --to")
    document = _split(text, name)
    data = frontmatter.read(document, name)
    prose_keys = front_matter_prose_keys(data)
    texts = {name: text, **{f"front matter {key}": data[key] for key in prose_keys}}
    kept: list[str] | None = [] if untranslated is not None else None
    # The front matter's prose is published too (layouts print a title or an excerpt, some as HTML): what
    # the model wrote there is escaped like the body's.
    done = translate_texts(
        texts,
        lang.code,
        backend,
        cache,
        usage,
        source_lang,
        published_as_markdown=set(texts),
        untranslated=kept,
        verify=verify,
    )
    if data is None:
        data = CommentedMap()
    for key in prose_keys:
        # Keep the source's quoting style: a DoubleQuotedScalarString stays double-quoted.
        value = done[f"front matter {key}"]
        data[key] = type(data[key])(value) if type(data[key]) is not str else value
    data["lang"] = lang.code
    data["dir"] = lang.dir
    data["translated"] = True
    data["source_hash"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if kept:  # a reader can tell a page that mixes languages, and where
        data["untranslated"] = untranslated_places(kept)
        untranslated += kept
    # The body's front matter range was copied unchanged, so it ends where the source's does.
    return frontmatter.join(data, frontmatter.body(document, done[name]))


def output_path(source: Path, target: str, out_dir: Path | None = None) -> Path:
    """Where the `target` copy of `source` goes: <dir>/<lang>/<name>-<lang>.md, as in
    _posts/<lang>/DATE-slug-<lang>.md. <dir> is `out_dir`, else the folder holding the source's
    language folder (_posts for _posts/zh/x.md), else the source's folder."""
    codes = sorted(known_languages(), key=len, reverse=True)  # zh-Hant before zh
    base = source.stem
    for code in codes:
        if base.lower().endswith(f"-{code.lower()}"):
            base = base[: -len(code) - 1]
            break
    if out_dir is None:
        in_language_folder = source.parent.name.lower() in (code.lower() for code in codes)
        out_dir = source.parent.parent if in_language_folder else source.parent
    code = language(target).code
    return out_dir / code / f"{base}-{code}{source.suffix or '.md'}"


def translate_file(
    source: Path,
    targets: list[str],
    backend: Backend,
    cache: Cache | None = None,
    usage: Usage | None = None,
    out_dir: Path | None = None,
    source_lang: str | None = None,
    untranslated: dict[str, list[str]] | None = None,
    verify: bool | None = None,
) -> list[Path]:
    """Translate a Markdown post into each target language and write the copies, all or none:
    if any language fails its checks, nothing is written. Targets in the post's own language
    are skipped. Returns the paths written. With an `untranslated` dict, segments that fail every
    retry keep their source text instead (translate_markdown), listed there by language code. verify: as for
    translate_texts."""
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {source}: {exc}; check the path") from None
    langs = [language(target) for target in targets]  # every code checked before any request
    source_lang = language(source_lang).code if source_lang else markdown_lang(text, source.name)
    outputs = {}
    for lang in langs:
        if lang.code == source_lang:
            log.warning("%s is already in %s; skipped", source, lang.code)
            continue
        kept: list[str] | None = [] if untranslated is not None else None
        try:
            outputs[output_path(source, lang.code, out_dir)] = translate_markdown(
                text,
                lang.code,
                backend,
                cache,
                usage,
                source_lang,
                name=source.name,
                untranslated=kept,
                verify=verify,
            )
        except TranslationFailed as exc:
            raise TranslationFailed(
                f"translating {source} to {lang.code} failed, nothing was written: {exc}; "
                f"rerun (answers that passed are cached) or try another --model"
            ) from None
        if kept:
            untranslated[lang.code] = kept
    for path, content in outputs.items():
        write_atomic(path, content)
    return list(outputs)
