"""How good are a model's explanations? Key points recalled, false readings and names invented, over a
fixed set of code.

    python benchmarks/eval_explain.py --backend local [--model PATH]
    python benchmarks/eval_explain.py --backend openai --base-url URL --model M
        [--pieces N] [--max-lines N] [--cache-dir DIR] [--no-cache]
    python benchmarks/eval_explain.py --rescore

Each piece of eval_set/pieces.toml names a file (relative to the project root) and a symbol in it.
The explain pipeline writes a post about that symbol with the chosen backend, and the post's prose
(title, introduction and the explanation of every chunk; code blocks a model copies into its
answer do not count) is scored:

- Key-point recall: a piece lists 2-4 things any correct explanation states, each as alternative
  words or phrases. A point is recalled when one alternative appears in the prose, ignoring case,
  starting at the beginning of a word: "sort" finds "sorted" but "heap" does not find "cheap".
- False readings: a piece lists 0-3 likely wrong statements about its code (a min read as a max,
  a mask of prompt positions read as generated ones), each as alternative phrases matched the same
  way. A reading is hit when one phrase appears in the prose; the score is the number hit per post.
  They are the regression check of benchmarks/results/audit.md, which judged every sentence of the
  default model's posts: a hit is a false statement, but a post without hits can still hold others.
- Invented names: the names the project's own grounding check flags (backticked names the code
  the model was shown does not contain), plus the piece's `must_not_invent` names wherever the
  prose mentions them, backticked or not. Counted once each, per post.

Also measured: wall time and tokens per piece. Pieces run one after another, so each time is
its own; the first piece the local model answers includes loading it. Answers are cached in
benchmarks/.eval-cache (not the user's cache), so a rerun asks the model nothing and is instant;
wall time and tokens of a piece answered wholly from the cache are carried over from the earlier
results file when it holds the same answers. A piece whose explanation fails (an answer cut off,
a server error) scores zero recall and is counted as failed; the run goes on.

Results: a per-piece table and a table with one row per model (every results/eval_*.json) on
stdout, progress on stderr, and this run in benchmarks/results/eval_<model>.json.

--rescore asks no model: it rereads every results/eval_*.json, scores the stored prose again against
the eval set as it is now (recall and false readings; invented names stay as stored, since the
grounding check needs the post itself), rewrites the files and prints the models table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import date as Date
from pathlib import Path
from statistics import mean

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from markdown_it import MarkdownIt

from explainer.backends import BACKENDS, Backend, Usage
from explainer.cache import Cache
from explainer.chunking import ChunkedFile, chunk_file
from explainer.cli import make_backend, open_cache
from explainer.errors import UserError
from explainer.explain import explain_file, known_names, occurs_as_name, off_piece, ungrounded_names
from explainer.fileio import write_atomic
from explainer.post import Post

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # piece files are relative to the project root
EVAL_SET = HERE / "eval_set" / "pieces.toml"
RESULTS = HERE / "results"
DEFAULT_CACHE_DIR = HERE / ".eval-cache"
POINTS_PER_PIECE = range(2, 5)
FALSE_READINGS_PER_PIECE = range(0, 4)


@dataclass(frozen=True)
class Piece:
    id: str
    file: str  # relative to the project root, as prompts and the post name it
    symbol: str
    points: dict[str, tuple[str, ...]]  # what a correct explanation states -> alternative wordings
    must_not_invent: tuple[str, ...]
    # what a likely wrong explanation claims -> phrases that say it
    false_readings: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _phrase_lists(table) -> bool:
    """Whether a TOML table maps each claim to a non-empty list of non-empty strings."""
    return isinstance(table, dict) and all(
        isinstance(claim, str)
        and claim.strip()
        and isinstance(phrases, list)
        and phrases
        and all(isinstance(p, str) and p.strip() for p in phrases)
        for claim, phrases in table.items()
    )


def load_pieces(path: Path) -> list[Piece]:
    """The eval set, checked: unique ids, a file and a symbol each, 2-4 points with alternatives,
    0-3 false readings with alternatives."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"{path.name}: cannot read the eval set: {exc}") from None
    pieces: list[Piece] = []
    for number, entry in enumerate(data.get("piece", []), start=1):
        where = f"{path.name}, piece {number} ({entry.get('id', 'no id')})"
        if not all(isinstance(entry.get(key), str) and entry[key] for key in ("id", "file", "symbol")):
            raise UserError(f"{where}: needs id, file and symbol")
        points = entry.get("points", {})
        if not _phrase_lists(points) or len(points) not in POINTS_PER_PIECE:
            raise UserError(f"{where}: needs 2 to 4 points, each a list of words or phrases")
        false_readings = entry.get("false_readings", {})
        if not _phrase_lists(false_readings) or len(false_readings) not in FALSE_READINGS_PER_PIECE:
            raise UserError(
                f"{where}: false_readings must be a table of 0 to 3 readings, each what it claims = "
                '["phrase", ...], a non-empty list of words or phrases'
            )
        if entry["id"] in {piece.id for piece in pieces}:
            raise UserError(f"{where}: the id is used twice")
        pieces.append(
            Piece(
                id=entry["id"],
                file=entry["file"],
                symbol=entry["symbol"],
                points={what: tuple(alternatives) for what, alternatives in points.items()},
                must_not_invent=tuple(entry.get("must_not_invent", ())),
                false_readings={claim: tuple(phrases) for claim, phrases in false_readings.items()},
            )
        )
    if not pieces:
        raise UserError(f"{path.name}: no [[piece]] entries")
    return pieces


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

_markdown = MarkdownIt("commonmark")


def prose_of(markdown: str) -> str:
    """The words of a Markdown text: markup dropped, inline code kept as its text, and block
    code and HTML left out, so a model that pastes the code back earns nothing for it."""
    paragraphs = []
    for token in _markdown.parse(markdown):
        if token.type != "inline":  # fence, code_block and html_block hold no inline tokens
            continue
        pieces = []
        for child in token.children or ():
            if child.type in ("text", "code_inline"):
                pieces.append(child.content)
            elif child.type in ("softbreak", "hardbreak"):
                pieces.append(" ")
        paragraphs.append(" ".join("".join(pieces).split()))
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def post_prose(post: Post, symbol: str) -> str:
    """Everything the post says in its own words: title, introduction, each chunk's explanation.
    A title that is just the symbol is the pipeline's default for an answer without a heading,
    not the model's words, so it is left out."""
    title = "" if post.title == symbol else post.title
    return "\n\n".join(
        filter(None, [title, prose_of(post.intro), *(prose_of(section.explanation) for section in post.sections)])
    )


def _is_word_char(char: str) -> bool:
    return char.isalnum() or char == "_"


def mentions(prose: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `prose`, ignoring case and how whitespace is laid out, starting
    at the beginning of a word. Only the start is anchored, so a stem finds its inflections
    ("normaliz" finds "normalizes") without an alternative having to list each one."""
    text = " ".join(prose.lower().split())
    wanted = " ".join(phrase.lower().split())
    start = text.find(wanted)
    while start != -1:
        if start == 0 or not _is_word_char(text[start - 1]) or not _is_word_char(wanted[0]):
            return True
        start = text.find(wanted, start + 1)
    return False


def first_mentioned(prose: str, table: dict[str, tuple[str, ...]]) -> dict[str, str | None]:
    """For each entry of a points or false-readings table, the first of its phrases that `prose`
    mentions, or None."""
    return {what: next((p for p in phrases if mentions(prose, p)), None) for what, phrases in table.items()}


def score_prose(piece: Piece, prose: str) -> dict:
    """What a post's prose alone decides: key-point recall and the false readings hit."""
    points = first_mentioned(prose, piece.points)
    recalled = sum(hit is not None for hit in points.values())
    return {
        "recall_pct": round(100 * recalled / len(points), 1),
        "points": points,
        "false_readings": first_mentioned(prose, piece.false_readings),
    }


def false_hits(record: dict) -> dict[str, str] | None:
    """The false readings a record's post hit (claim -> phrase), or None for a record written before
    false readings were scored."""
    if "false_readings" not in record:
        return None
    return {claim: phrase for claim, phrase in record["false_readings"].items() if phrase is not None}


def score(piece: Piece, post: Post, chunked: ChunkedFile) -> dict:
    """Key-point recall, false readings and invented names of one post; `chunked` is the piece's
    file as chunked for it (the grounding check needs the source and the file's own names)."""
    prose = post_prose(post, piece.symbol)
    # The chunk explanations were checked by explain_file against exactly what each prompt showed
    # (Section.ungrounded); the introduction is only warned about there, so it is checked here,
    # against the whole file.
    flagged = [name for section in post.sections for name in section.ungrounded]
    flagged += ungrounded_names(post.intro, chunked.source, known_names(chunked))
    invented: dict[str, dict] = {}
    for name in flagged:
        invented.setdefault(name.lower(), {"name": name, "found_by": "grounding check"})
    for name in piece.must_not_invent:
        if occurs_as_name(name.lower(), prose.lower()):
            invented.setdefault(name.lower(), {"name": name, "found_by": "must_not_invent"})
    return {**score_prose(piece, prose), "invented": list(invented.values()), "prose": prose}


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def evaluate_piece(piece: Piece, backend: Backend, cache: Cache | None, max_lines: int, root: Path) -> dict:
    """Explain one piece and score the post. A failed explanation (UserError) is recorded, not raised."""
    record = {"id": piece.id, "file": piece.file, "symbol": piece.symbol}
    usage, warnings = Usage(), []
    started = time.perf_counter()
    try:
        post, _ = explain_file(
            root / piece.file,
            piece.symbol,
            backend=backend,
            cache=cache,
            max_lines=max_lines,
            usage=usage,
            on_warning=warnings.append,
            display_path=piece.file,
        )
        chunked = chunk_file(root / piece.file, piece.symbol, max_lines=max_lines, display_path=piece.file)
    except UserError as exc:
        record.update(
            error=str(exc),
            recall_pct=0.0,
            points={what: None for what in piece.points},
            false_readings={claim: None for claim in piece.false_readings},
            invented=[],
        )
    else:
        record.update(
            code_language=chunked.code_language,
            lines=sum(c.end_line - c.start_line + 1 for c in chunked.chunks),
            chunks=len(chunked.chunks),
            answers_sha256=answers_digest(post),
            **score(piece, post, chunked),
            # answers not about their piece: asked again (explain_file), and still so in the post
            asked_again=usage.extra.get("off_piece", 0),
            off_piece=[
                reason
                for section, chunk in zip(post.sections, chunked.chunks)
                if (reason := off_piece(chunked, chunk, section.explanation)) is not None
            ],
        )
    record.update(
        wall_s=round(time.perf_counter() - started, 2),
        tokens_in=usage.tokens_in,
        tokens_out=usage.tokens_out,
        requests=usage.requests,
        cache_hits=usage.cache_hits,
        measured_on=Date.today().isoformat(),
        warnings=warnings,
    )
    return record


def answers_digest(post: Post) -> str:
    """A fingerprint of what the model wrote for a post. Not of the scored prose: a change to the
    scoring must not make the same answers look new."""
    written = [post.title, post.intro, *(section.explanation for section in post.sections)]
    return hashlib.sha256(json.dumps(written, ensure_ascii=False).encode("utf-8")).hexdigest()


def carry_measurements(record: dict, earlier: dict | None) -> None:
    """A piece answered wholly from the cache took no model time in this run: its wall time and
    tokens are the earlier run's, when that run got the same answers; otherwise unknown (None)."""
    if record["requests"] or "error" in record:
        return
    same = (
        earlier is not None and earlier.get("answers_sha256") == record["answers_sha256"] and earlier.get("measured_on")
    )
    for key in ("wall_s", "tokens_in", "tokens_out", "measured_on"):
        record[key] = earlier[key] if same else None


def summarize(records: list[dict]) -> dict:
    """The run's overall numbers. Recall averages pieces (failed ones count as 0); false readings
    and invented names are per post written; time and tokens cover the pieces whose measurements
    are known."""
    written = [len(r["invented"]) for r in records if "error" not in r]
    false = [len(hits) for r in records if "error" not in r and (hits := false_hits(r)) is not None]
    measured = [r for r in records if r["measured_on"] is not None]
    return {
        "pieces": len(records),
        "failed": len(records) - len(written),
        "recall_pct": round(mean(r["recall_pct"] for r in records), 1),
        "false_mean": round(mean(false), 2) if false else None,
        # answers not about their lines: None for a results file written before they were counted
        "off_piece": sum(len(r["off_piece"]) for r in records if "off_piece" in r)
        if any("off_piece" in r for r in records)
        else None,
        "asked_again": sum(r.get("asked_again", 0) for r in records)
        if any("asked_again" in r for r in records)
        else None,
        "invented_mean": round(mean(written), 2) if written else None,
        "invented_max": max(written, default=None),
        "measured": len(measured),
        "wall_s": round(sum(r["wall_s"] for r in measured), 1),
        "tokens_in": sum(r["tokens_in"] for r in measured),
        "tokens_out": sum(r["tokens_out"] for r in measured),
    }


def results_path(model: str, results: Path) -> Path:
    """results/eval_<model>.json, the model's name made safe for a file name (no folders)."""
    return results / f"eval_{re.sub(r'[^A-Za-z0-9._-]+', '_', model)}.json"


def _cell(value, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _per(total, count):
    return total / count if count else None


def _false_cell(record: dict) -> str:
    hits = false_hits(record)
    if hits is None:
        return "n/a"
    return "; ".join(f'{claim} ("{phrase}")' for claim, phrase in hits.items()).replace("|", "/") or "-"


def pieces_table(records: list[dict]) -> str:
    lines = [
        "| piece | recall | missed points | false readings hit | invented names | s | tokens out |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for r in records:
        missed = "; ".join(what for what, hit in r["points"].items() if hit is None) or "-"
        invented = ", ".join(f"`{n['name']}`" for n in r["invented"]) or "-"
        false = _false_cell(r)
        if "error" in r:
            false, invented = "-", "failed: " + r["error"].replace("|", "/")
        lines.append(
            f"| {r['id']} | {_cell(r['recall_pct'], unit='%')} | {missed} | {false} | {invented} "
            f"| {_cell(r['wall_s'])} | {_cell(r['tokens_out'])} |"
        )
    return "\n".join(lines)


def models_table(runs: list[dict]) -> str:
    """One row per model, best recall first. A results file written before false readings were
    scored shows n/a for them."""
    lines = [
        "| model | backend | pieces | failed | key-point recall | false readings/post (mean) "
        "| invented/post (mean) | invented (max) | off-piece answers (asked again) | s/piece | tokens in/piece "
        "| tokens out/piece |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda run: -run["summary"]["recall_pct"]):
        s = run["summary"]
        lines.append(
            f"| {run['model']} | {run['backend']} | {s['pieces']} | {s['failed']} "
            f"| {_cell(s['recall_pct'], unit='%')} | {_cell(s.get('false_mean'), 2)} "
            f"| {_cell(s['invented_mean'], 2)} "
            f"| {_cell(s['invented_max'])} | {_off_piece_cell(s)} | {_cell(_per(s['wall_s'], s['measured']))} "
            f"| {_cell(_per(s['tokens_in'], s['measured']), 0)} "
            f"| {_cell(_per(s['tokens_out'], s['measured']), 0)} |"
        )
    return "\n".join(lines)


def _off_piece_cell(summary: dict) -> str:
    if summary.get("off_piece") is None:
        return "n/a"
    return f"{summary['off_piece']} ({_cell(summary.get('asked_again'))})"


def _progress_line(number: int, total: int, r: dict) -> str:
    head = f"[{number}/{total}] {r['id']}:"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    recalled = sum(hit is not None for hit in r["points"].values())
    hits = false_hits(r) or {}
    invented = ", ".join(n["name"] for n in r["invented"])
    cost = (
        "from cache" if not r["requests"] else f"{r['wall_s']:.1f} s, {r['tokens_in']} tokens in, {r['tokens_out']} out"
    )
    return (
        f"{head} recall {recalled}/{len(r['points'])}, false readings {len(hits)}/{len(r['false_readings'])}"
        f"{' (' + '; '.join(hits) + ')' if hits else ''}, invented {len(r['invented'])}"
        f"{' (' + invented + ')' if invented else ''}; {cost}"
    )


def _earlier_records(path: Path) -> dict[str, dict]:
    try:
        return {r["id"]: r for r in json.loads(path.read_text(encoding="utf-8"))["pieces"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no earlier run, or a file this version cannot read: measure afresh


def _shown(path: Path) -> str:
    """How files and messages name a path: relative to the project, so no machine's folders show."""
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.name


def _open_cache(cache_dir: str | None, no_cache: bool) -> Cache | None:
    cache = open_cache(str(cache_dir or DEFAULT_CACHE_DIR), no_cache)
    if cache is not None and cache_dir is None:
        # Like .pytest_cache: the folder keeps itself out of git, whatever the project's .gitignore says.
        write_atomic(DEFAULT_CACHE_DIR / ".gitignore", "*\n")
    return cache


def run(args: argparse.Namespace) -> int:
    pieces = load_pieces(EVAL_SET)[: args.pieces]
    backend = make_backend(args.backend, args.model, args.base_url)
    cache = _open_cache(args.cache_dir, args.no_cache)
    output = results_path(backend.model, RESULTS)
    earlier = _earlier_records(output)
    print(
        f"{backend.name} {backend.model}: {len(pieces)} piece(s), max {args.max_lines} lines per chunk", file=sys.stderr
    )
    records = []
    for number, piece in enumerate(pieces, start=1):
        print(f"[{number}/{len(pieces)}] {piece.id} ({piece.file}, {piece.symbol}) ...", file=sys.stderr, flush=True)
        record = evaluate_piece(piece, backend, cache, args.max_lines, ROOT)
        carry_measurements(record, earlier.get(piece.id))
        records.append(record)
        print(_progress_line(number, len(pieces), record), file=sys.stderr, flush=True)
    if all("error" in r for r in records):
        # Most likely the backend itself is unusable (server down, bad model): keep the last good results.
        raise UserError(f"every piece failed, nothing written; the first: {records[0]['error']}")
    result = {
        "model": backend.model,
        "backend": backend.name,
        "date": Date.today().isoformat(),
        "max_lines": args.max_lines,
        "eval_set": _shown(EVAL_SET),
        "summary": summarize(records),
        "pieces": records,
    }
    write_atomic(output, json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    print(
        f"## {backend.model} ({backend.name}), per piece\n\n{pieces_table(records)}\n\n"
        f"## All models\n\n{models_table(_load_runs(RESULTS))}"
    )
    print(f"wrote {_shown(output)}", file=sys.stderr)
    return 0


def _load_runs(results: Path) -> list[dict]:
    runs = []
    for path in sorted(results.glob("eval_*.json")):
        try:
            runs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            print(f"warning: skipped {path.name}: not readable JSON", file=sys.stderr)
    return runs


def rescored_record(record: dict, piece: Piece) -> dict:
    """A stored record scored again against `piece` as the eval set has it now: recall and false
    readings from the stored prose (a failed post scores nothing); everything else as stored."""
    if "error" in record:
        scores = {
            "recall_pct": 0.0,
            "points": {what: None for what in piece.points},
            "false_readings": {claim: None for claim in piece.false_readings},
        }
    else:
        scores = score_prose(piece, record["prose"])
    updated = {}
    for key, value in record.items():
        if key != "false_readings":
            updated[key] = scores.get(key, value)
        if key == "points":  # false readings go beside the points, where a new run writes them
            updated["false_readings"] = scores["false_readings"]
    return updated


def rescore(results: Path, eval_set: Path) -> int:
    """Score every results/eval_*.json again from its stored prose and rewrite it; no model is asked.
    Records of pieces the eval set no longer has are kept as they were."""
    pieces = {piece.id: piece for piece in load_pieces(eval_set)}
    paths = sorted(results.glob("eval_*.json"))
    if not paths:
        raise UserError(f"no eval_*.json in {_shown(results)}: nothing to rescore")
    for path in paths:
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
            before = run["summary"]["recall_pct"]
            kept = [r.get("id") for r in run["pieces"] if r.get("id") not in pieces]
            records = [r if r.get("id") not in pieces else rescored_record(r, pieces[r["id"]]) for r in run["pieces"]]
            summary = summarize(records)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"warning: skipped {path.name}: not a results file this version reads ({exc!r})", file=sys.stderr)
            continue
        rewritten = {}
        for key, value in run.items():
            rewritten[key] = {"pieces": records, "summary": summary}.get(key, value)
            if key == "date":  # the date the answers were written stays; this says when they were scored
                rewritten["rescored"] = Date.today().isoformat()
        write_atomic(path, json.dumps(rewritten, ensure_ascii=False, indent=2) + "\n")
        print(
            f"rescored {_shown(path)}: recall {before}% -> {summary['recall_pct']}%, "
            f"false readings/post {_cell(summary['false_mean'], 2)}"
            + (f"; not in the eval set, kept as they were: {', '.join(map(str, kept))}" if kept else ""),
            file=sys.stderr,
        )
    print(f"## All models\n\n{models_table(_load_runs(results))}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=list(BACKENDS),
        help="local: the bundled llama_ref model; openai: any OpenAI-compatible API "
        "[default: openai if OPENAI_API_KEY or a server is set, else local]",
    )
    parser.add_argument("--model", help="model file or name (local) or model name (openai)")
    parser.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--pieces", type=int, metavar="N", help="only the first N pieces of the set")
    parser.add_argument(
        "--max-lines",
        type=int,
        default=30,
        metavar="N",
        help="split definitions longer than this into chunks (as explainer explain) [30]",
    )
    parser.add_argument("--cache-dir", help="answer cache folder [benchmarks/.eval-cache]")
    parser.add_argument("--no-cache", action="store_true", help="ask the model again for every answer")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="ask no model: score the prose stored in results/eval_*.json again (recall, false readings) "
        "and rewrite those files",
    )
    args = parser.parse_args(argv)
    if args.rescore and any(
        value is not None for value in (args.backend, args.model, args.base_url, args.pieces, args.cache_dir)
    ):
        parser.error("--rescore asks no model: it takes no --backend, --model, --base-url, --pieces or --cache-dir")
    if args.pieces is not None and args.pieces < 1:
        parser.error("--pieces must be at least 1")
    if args.max_lines < 1:
        parser.error("--max-lines must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return rescore(RESULTS, EVAL_SET) if args.rescore else run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
