"""Rows for the hand-labelled set (benchmarks/translation_labels.jsonl) from a translation run: every translatable
segment of a Markdown post, with the translation a run left in the answer cache, one JSON line per segment and
language, in the set's format with `faithful` and `note` left for a reader to fill in.

    explainer translate POST --to zh,ja,fr,ar --backend local --verify none --cache-dir DIR
    python benchmarks/label_candidates.py POST --to zh,ja,fr,ar --backend local --cache-dir DIR > rows.jsonl

Run the translation with --verify none: the set should hold what the model writes first, before the meaning
checks ask again. A segment whose translation is not in the cache (it failed every structural check) is left
out and counted on stderr. No model runs: the backend is named only for the cache keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from explainer import frontmatter
from explainer.backends import BACKENDS, Usage
from explainer.cache import Cache
from explainer.cli import make_backend
from explainer.errors import UserError
from explainer.languages import language
from explainer.markdown_segments import split_document
from explainer.translate import SegmentTranslator, front_matter_prose_keys, markdown_lang


def candidates(post: Path, targets: list[str], backend, cache: Cache, origin: str) -> tuple[list[dict], int]:
    """(rows, how many segments had no cached translation)."""
    text = post.read_text(encoding="utf-8")
    source_lang = markdown_lang(text, post.name)
    # as translate_markdown sends them: the body, then the front matter's prose
    document = split_document(text)
    data = frontmatter.read(document, post.name)
    texts = [text] + [data[key] for key in front_matter_prose_keys(data)]
    segments = [segment for each in texts for segment in split_document(each).segments if segment.translatable]
    rows, missing = [], 0
    for target in targets:
        translator = SegmentTranslator(language(target), backend, cache, Usage(), source_lang, verify=False)
        for segment in segments:
            hit = cache.get(translator.key(segment))
            if hit is None:
                missing += 1
                continue
            rows.append(
                {
                    "origin": origin,
                    "lang": language(target).code,
                    "source_lang": source_lang,
                    "source": segment.text,
                    "translation": hit.text,
                    "pairs": [list(pair) for pair in segment.pairs],
                    "faithful": None,
                    "note": "",
                }
            )
    return rows, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("post", type=Path)
    parser.add_argument("--to", required=True, help="languages, comma-separated, as the translation run had them")
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="local")
    parser.add_argument("--model")
    parser.add_argument("--base-url")
    parser.add_argument("--cache-dir", required=True, help="the translation run's cache")
    parser.add_argument("--origin", help="what the rows' origin says [default: the post and the model]")
    args = parser.parse_args(argv)
    try:
        if not args.post.is_file():
            raise UserError(f"{args.post}: no such file; name a Markdown post")
        backend = make_backend(args.backend, args.model, args.base_url)
        origin = args.origin or f"{args.post.name} translated by {args.backend} {backend.model}, --verify none"
        rows, missing = candidates(args.post, args.to.split(","), backend, Cache(args.cache_dir), origin)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    print(f"{len(rows)} rows; {missing} segment translations not in the cache", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
