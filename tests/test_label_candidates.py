"""benchmarks/label_candidates.py: the segments of a translation run, listed from its cache for labelling, through
the real openai SDK against a scripted server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from scripted_server import user_text

from explainer.backends.openai import OpenAIBackend
from explainer.cache import Cache
from explainer.translate import translate_markdown

POST = "---\ntitle: Sampling\n---\n## Sampling\n\nKeep `top_p` below one.\n\n```python\nx = 1\n```\n"
ZH = {"Sampling": "采样", "Keep ⟦1⟧ below one.": "保持 ⟦1⟧ 低于 1。"}


def _load(name: str):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_segment_is_listed_with_the_translation_the_run_cached(tmp_path, scripted_server, openai_env, capsys):
    server = scripted_server(
        lambda body: json.dumps(
            {key: ZH[text] for key, text in json.loads(user_text(body)).items()}, ensure_ascii=False
        )
    )
    post, cache_dir = tmp_path / "post.md", tmp_path / "cache"
    post.write_text(POST, encoding="utf-8")
    backend = OpenAIBackend(model="test-model", base_url=server.base_url, backoff=0.001)
    translate_markdown(POST, "zh", backend, Cache(cache_dir), source_lang="en", verify=False)
    asked = len(server.requests)

    common = ["--backend", "openai", "--model", "test-model", "--base-url", server.base_url]
    assert _load("label_candidates").main([str(post), "--to", "zh", *common, "--cache-dir", str(cache_dir)]) == 0

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the heading and the paragraph, and the front matter's title (the same text as the heading): each as sent
    assert sorted((row["source"], row["translation"]) for row in rows) == sorted(
        [("Sampling", "采样"), ("Keep ⟦1⟧ below one.", "保持 ⟦1⟧ 低于 1。"), ("Sampling", "采样")]
    )
    assert {(row["lang"], row["source_lang"], row["faithful"]) for row in rows} == {("zh", "en", None)}
    assert len(server.requests) == asked  # read from the cache: no model asked
    # and the rows load as the labelled set's, once a reader has labelled them
    labelled = tmp_path / "labels.jsonl"
    labelled.write_text("".join(json.dumps({**row, "faithful": True}) + "\n" for row in rows), encoding="utf-8")
    assert len(_load("round_trip_eval").load_labels(labelled)) == 3
