"""How well do the meaning checks tell faithful translations from unfaithful ones? Over a hand-labelled set.

    python benchmarks/round_trip_eval.py --backend local [--model NAME]
    python benchmarks/round_trip_eval.py --backend openai --base-url URL --model M
        [--labels FILE] [--cache-dir DIR] [--no-cache]
    python benchmarks/round_trip_eval.py --rescore      # the read-backs of the last run, scored again: no model
    python benchmarks/round_trip_eval.py --backend local --cached-only   # what the cache holds: no model

benchmarks/translation_labels.jsonl holds one translated segment a line, as the checks see it (code, URLs and
the like as markers ⟦1⟧, ⟦2⟧, ...), with these keys:

- lang, source_lang: the translation's language and its source's;
- source, translation: the segment and its translation;
- pairs: [open, close] of each link whose text is prose, as in the segment (Segment.pairs);
- faithful: true when the translation says what the source says, by a reader's judgement, and note: why;
- origin: where the translation came from.

Each translation is read back into its source language with the request the checks send
(explainer.translate.read_back_request), and the words its links and emphasis mark are translated alone, through
an answer cache (benchmarks/.eval-cache). Scored as the checks score them (translation_checks.meaning_problems):
a segment is flagged when its read-back's chrF against the source is under the threshold for its source language
(translation_checks.round_trip_min_chrf), or when a link or emphasis marks other words. For the check as it
stands, and for each threshold of a sweep over the sources whose words are spaced (en) and those whose words
are not (zh, ja): the share of the unfaithful segments flagged (recall), the share of the faithful ones
flagged, and precision.

--cached-only scores the segments whose answers an earlier, interrupted run left in the cache and leaves the
others out, counted: a run on a slow machine can be stopped and scored.

Results: benchmarks/results/translation_round_trip.md and .json (every read-back, so --rescore needs no model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import date as Date
from pathlib import Path

from explainer.backends import BACKENDS, Usage
from explainer.cache import Cache, complete_cached, key_for
from explainer.cli import make_backend
from explainer.errors import UserError
from explainer.fileio import write_atomic
from explainer.languages import language
from explainer.markdown_segments import Segment, placeholder_numbers
from explainer.translate import marked_words_request, read_back_request, single_answer
from explainer.translation_checks import (
    ROUND_TRIP_MIN_CHRF,
    ROUND_TRIP_MIN_CHRF_UNSPACED,
    chrf,
    marked_words,
    marked_words_problems,
    names_alone,
    names_problem,
    round_trip_min_chrf,
)

HERE = Path(__file__).resolve().parent
LABELS = HERE / "translation_labels.jsonl"
RESULTS = HERE / "results" / "translation_round_trip"
SWEEP = (20, 25, 30, 35, 40, 45, 50, 55, 60)


@dataclass(frozen=True)
class Labelled:
    lang: str
    source_lang: str
    source: str
    translation: str
    pairs: tuple[tuple[int, int], ...]
    faithful: bool
    note: str
    origin: str

    def segment(self) -> Segment:
        """The source as a Segment, as far as the meaning checks read one: its text and its links' markers."""
        count = max(placeholder_numbers(self.source) or [0])
        return Segment(self.source, ("",) * count, ("",) * count, self.pairs, self.source, 0, 0, 0)


def load_labels(path: Path) -> list[Labelled]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            row = Labelled(
                data["lang"],
                data["source_lang"],
                data["source"],
                data["translation"],
                tuple(tuple(pair) for pair in data.get("pairs", ())),
                bool(data["faithful"]),
                data.get("note", ""),
                data.get("origin", ""),
            )
            language(row.lang), language(row.source_lang)  # known codes, or one clear line
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path.name} line {number}: {exc!r}; see the format in {Path(__file__).name}") from None
        if placeholder_numbers(row.source) is None or placeholder_numbers(row.translation) is None:
            raise UserError(f"{path.name} line {number}: a broken marker (⟦ without ⟧ and a number)")
        rows.append(row)
    return rows


def read_back(
    rows: list[Labelled], backend, cache: Cache | None, cached_only: bool = False
) -> tuple[list[str | None], dict[tuple, str], float]:
    """Each translation read back, the marked source words translated alone (by (words, lang)), and the wall
    seconds it took: one call, as the checks make it, so the local model runs them side by side. With
    cached_only, only what `cache` holds, and None for a read-back it does not."""
    alone_keys = sorted(
        {
            (words, row.lang)
            for row in rows
            for _, words in marked_words(row.source, row.pairs)
            if any(char.isalpha() for char in words)
        }
    )
    requests = [read_back_request(row.translation, row.pairs, row.source_lang) for row in rows]
    requests += [marked_words_request(words, lang) for words, lang in alone_keys]
    answers: dict[int, str] = {}
    started = time.monotonic()
    if cached_only:
        if cache is None:
            raise UserError("--cached-only reads the cache: leave out --no-cache")
        hits = [cache.get(key_for(backend, request)) for request in requests]
        answers = {index: single_answer(hit.text) for index, hit in enumerate(hits) if hit is not None}
    else:
        try:
            complete_cached(
                backend, requests, cache, Usage(), on_done=lambda i, c: answers.__setitem__(i, single_answer(c.text))
            )
        except UserError as exc:  # an unusable answer reads as nothing, as in the checks; the rest still count
            print(f"warning: {exc}", file=sys.stderr)
    seconds = time.monotonic() - started
    alone = {key: answers.get(index, "") for index, key in enumerate(alone_keys, len(rows))}
    missing = None if cached_only else ""
    return [answers.get(index, missing) for index in range(len(rows))], alone, seconds


def score(rows: list[Labelled], backs: list[str | None], alone: dict[tuple, str]) -> list[dict]:
    """One record per segment read back (None: not read back, left out)."""
    records = []
    for row, back in zip(rows, backs):
        if back is None:
            continue
        mine = {words: text for (words, lang), text in alone.items() if lang == row.lang}
        records.append(
            {
                "lang": row.lang,
                "source_lang": row.source_lang,
                "faithful": row.faithful,
                "source": row.source,
                "translation": row.translation,
                "read_back": back,
                "chrf": round(chrf(back, row.source), 1),
                "threshold": round_trip_min_chrf(row.source_lang),
                "marked_words": marked_words_problems(row.segment(), row.translation, back, mine),
                "names": names_problem(row.segment(), row.translation),
                # names alone: the check reads nothing back (names_problem judges it); its chrF is shown, not used
                "names_alone": names_alone(row.segment()),
                "note": row.note,
            }
        )
    return records


def rates(records: list[dict], threshold: float | None = None) -> dict:
    """How the check does on `records` when a read-back must score `threshold` (None: each record's own, as
    the check has it for its source language)."""
    flagged = [
        (not r.get("names_alone") and r["chrf"] < (r["threshold"] if threshold is None else threshold))
        or bool(r["marked_words"])
        or bool(r["names"])
        for r in records
    ]
    bad = [f for f, r in zip(flagged, records) if not r["faithful"]]
    good = [f for f, r in zip(flagged, records) if r["faithful"]]
    return {
        "threshold": threshold,
        "unfaithful_flagged": sum(bad),
        "unfaithful": len(bad),
        "faithful_flagged": sum(good),
        "faithful": len(good),
        "precision": sum(bad) / sum(flagged) if any(flagged) else None,
    }


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / whole:.0f}%)" if whole else "-"


def report(result: dict) -> str:
    records = result["segments"]
    languages = sorted({(r["source_lang"], r["lang"]) for r in records})
    timing = (
        "answers from the cache of earlier runs"
        if result.get("cached_only")
        else f"{result['seconds']:.0f} s for {len(records)} read-backs and {result['alone']} marked-word requests"
    )
    left_out = (
        f" {result['unanswered']} of the set's segments were not read back and are left out."
        if result.get("unanswered")
        else ""
    )
    lines = [
        f"# The meaning checks on {len(records)} hand-labelled segments",
        "",
        f"Read back by {result['backend']} {result['model']} on {result['date']} ({timing}).{left_out} "
        f"Pairs: {', '.join(f'{a} to {b}' for a, b in languages)}. Labels: "
        f"`benchmarks/translation_labels.jsonl`; a segment is flagged when its translation leaves out or adds a name "
        f"(an acronym or identifier), its read-back scores under its source language's threshold (chrF "
        f"against the source), or a link or emphasis marks other words.",
        "",
    ]
    check = result["summary"]
    lines += [
        f"The check as it stands flags {_share(check['unfaithful_flagged'], check['unfaithful'])} of the unfaithful "
        f"segments and {_share(check['faithful_flagged'], check['faithful'])} of the faithful ones.",
        "",
        "| part of the check | unfaithful flagged | faithful flagged |",
        "|---|---:|---:|",
    ]
    parts = {
        "a name left out or added": lambda r: bool(r.get("names")),
        "read-back under its threshold (chrF)": lambda r: not r.get("names_alone") and r["chrf"] < r["threshold"],
        "marked words": lambda r: bool(r["marked_words"]),
    }
    for name, flags in parts.items():
        bad = [r for r in records if not r["faithful"]]
        good = [r for r in records if r["faithful"]]
        lines.append(
            f"| {name} | {_share(sum(map(flags, bad)), len(bad))} | {_share(sum(map(flags, good)), len(good))} |"
        )
    # one sweep per threshold the check applies: sources whose words are spaced (en), and those whose are not
    for least in sorted({r["threshold"] for r in records}, reverse=True):
        group = [r for r in records if r["threshold"] == least]
        sources = ", ".join(sorted({r["source_lang"] for r in group}))
        lines += [
            "",
            f"Sources the check holds to a chrF of {least:g} ({sources}), {len(group)} segments:",
            "",
            "| chrF threshold | unfaithful flagged (recall) | faithful flagged | precision |",
            "|---:|---:|---:|---:|",
        ]
        for threshold in sorted({*SWEEP, least}):
            row = rates(group, threshold)
            chosen = " (the check's)" if threshold == least else ""
            precision = "-" if row["precision"] is None else f"{100 * row['precision']:.0f}%"
            lines.append(
                f"| {threshold:g}{chosen} | {_share(row['unfaithful_flagged'], row['unfaithful'])} | "
                f"{_share(row['faithful_flagged'], row['faithful'])} | {precision} |"
            )
    lines += [
        "",
        "| lang | faithful | chrF | names, marked words | source | read back |",
        "|---|---|---:|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["faithful"], r["chrf"])):
        cells = [
            f"{r['source_lang']}→{r['lang']}",
            "yes" if r["faithful"] else f"no: {r['note']}",
            f"{r['chrf']:.1f}",
            "; ".join(([r["names"]] if r.get("names") else []) + r["marked_words"]),
            r["source"],
            r["read_back"],
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    rows = load_labels(Path(args.labels))
    results = Path(args.out)
    earlier = results.with_suffix(".json")
    if args.rescore:
        try:
            last = json.loads(earlier.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"--rescore needs {earlier.name} from an earlier run ({exc}); run with --backend") from None
        by_pair = {(r["source"], r["translation"]): r["read_back"] for r in last["segments"]}
        backs = [by_pair.get((row.source, row.translation)) for row in rows]
        alone = {(words, lang): text for words, lang, text in last["alone_translations"]}
        meta = {key: last.get(key) for key in ("backend", "model", "date", "seconds", "cached_only")}
    else:
        backend = make_backend(args.backend, args.model, args.base_url)
        cache = None if args.no_cache else Cache(args.cache_dir or HERE / ".eval-cache")
        print(f"{backend.name} {backend.model}: reading back {len(rows)} segments", file=sys.stderr, flush=True)
        backs, alone, seconds = read_back(rows, backend, cache, args.cached_only)
        meta = {
            "backend": backend.name,
            "model": backend.model,
            "date": Date.today().isoformat(),
            "seconds": seconds,
            "cached_only": args.cached_only,
        }
    records = score(rows, backs, alone)
    result = {
        **meta,
        "thresholds": {"spaced": ROUND_TRIP_MIN_CHRF, "unspaced": ROUND_TRIP_MIN_CHRF_UNSPACED},
        "alone": len(alone),
        "unanswered": sum(back is None for back in backs),
        "summary": rates(records),
        "segments": records,
        "alone_translations": [[words, lang, text] for (words, lang), text in sorted(alone.items())],
    }
    write_atomic(earlier, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    text = report(result)
    write_atomic(results.with_suffix(".md"), text)
    print(text)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=list(BACKENDS), help="the backend that reads back [as explainer's]")
    parser.add_argument("--model", help="model file or name (local) or model name (openai)")
    parser.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--labels", default=str(LABELS), help="the labelled set [benchmarks/translation_labels.jsonl]")
    parser.add_argument("--cache-dir", help="answer cache folder [benchmarks/.eval-cache]")
    parser.add_argument("--no-cache", action="store_true", help="ask the model again for every answer")
    parser.add_argument("--rescore", action="store_true", help="score the last run's read-backs again; no model")
    parser.add_argument(
        "--cached-only", action="store_true", help="score only what the cache holds from earlier runs; no model"
    )
    parser.add_argument(
        "--out",
        default=str(RESULTS),
        help="results, as OUT.md and OUT.json [benchmarks/results/translation_round_trip]",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
