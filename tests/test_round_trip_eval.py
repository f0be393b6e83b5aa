"""benchmarks/round_trip_eval.py: the meaning checks scored over a labelled set, through the real openai SDK
against a scripted server that reads translations back."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from scripted_server import user_text


def _load_runner():
    # benchmarks/ is not a package; registering the module first lets its dataclasses resolve.
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "round_trip_eval.py"
    spec = importlib.util.spec_from_file_location("round_trip_eval", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


round_trip_eval = _load_runner()

LABELS = [
    {"lang": "zh", "source_lang": "en", "source": "Raise it for stories:", "translation": "写故事时调高它：",
     "faithful": True, "note": "", "origin": "test"},
    {"lang": "zh", "source_lang": "en", "source": "Raise it for stories:", "translation": "请为故事起名:",
     "faithful": False, "note": "name the story", "origin": "test"},
    {"lang": "zh", "source_lang": "en",
     "source": "See the ⟦1⟧PyTorch docs⟦2⟧ for the reference definition, and note that ⟦3⟧.",
     "translation": "请参考 PyTorch 的文档 ⟦1⟧，并注意 ⟦3⟧。⟦2⟧", "pairs": [[1, 2]],
     "faithful": False, "note": "the link around the formula", "origin": "test"},
]  # fmt: skip
READ_BACK = {
    "写故事时调高它：": "Raise it when writing stories:",
    "请为故事起名:": "Please name the story:",
    "请参考 PyTorch 的文档 ⟦1⟧，并注意 ⟦3⟧。⟦2⟧": "Please refer to the PyTorch documentation ⟦1⟧, and note ⟦3⟧.⟦2⟧",
    "PyTorch docs": "PyTorch 文档",  # the link's words, alone
}


@pytest.fixture
def labels(tmp_path) -> Path:
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in LABELS), encoding="utf-8")
    return path


def test_the_labelled_set_is_scored_as_the_checks_score_it(labels, tmp_path, scripted_server, openai_env, capsys):
    server = scripted_server(
        lambda body: json.dumps({key: READ_BACK[text] for key, text in json.loads(user_text(body)).items()})
    )
    out = tmp_path / "result"
    common = ["--labels", str(labels), "--out", str(out)]

    assert round_trip_eval.main(["--backend", "openai", "--base-url", server.base_url, "--no-cache", *common]) == 0

    result = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert result["summary"] | {"precision": None} == {
        "threshold": None,  # each segment's own: its source language's
        "unfaithful_flagged": 2,
        "unfaithful": 2,
        "faithful_flagged": 0,
        "faithful": 1,
        "precision": None,
    }
    link = result["segments"][2]
    assert link["chrf"] >= round_trip_eval.ROUND_TRIP_MIN_CHRF and link["marked_words"]  # caught by its link only
    assert len(server.requests) == 4  # three read-backs and the link's words
    least = round_trip_eval.ROUND_TRIP_MIN_CHRF  # the sources are English: words spaced
    assert f"| {least:g} (the check's) | 2/2 (100%) | 0/1 (0%) | 100% |" in out.with_suffix(".md").read_text("utf-8")

    assert round_trip_eval.main(["--rescore", "--labels", str(labels), "--out", str(out)]) == 0
    assert len(server.requests) == 4  # no model asked
    assert json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))["segments"] == result["segments"]


def test_a_broken_label_is_one_line(tmp_path, capsys):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"lang": "zh"}\n', encoding="utf-8")
    assert round_trip_eval.main(["--rescore", "--labels", str(path), "--out", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: labels.jsonl line 1:") and error.count("\n") == 1


def test_cached_only_scores_what_an_interrupted_run_left_and_counts_the_rest(
    labels, tmp_path, scripted_server, openai_env
):
    """A run stopped part way (a slow machine) keeps its answers in the cache; --cached-only scores those."""
    server = scripted_server(
        lambda body: json.dumps({key: READ_BACK[text] for key, text in json.loads(user_text(body)).items()})
    )
    cache, out = tmp_path / "cache", tmp_path / "result"
    first = LABELS[:1]
    part = tmp_path / "part.jsonl"
    part.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in first), encoding="utf-8")
    common = ["--backend", "openai", "--base-url", server.base_url, "--cache-dir", str(cache), "--out", str(out)]
    assert round_trip_eval.main([*common, "--labels", str(part)]) == 0  # as if the run had stopped after one
    asked = len(server.requests)

    assert round_trip_eval.main([*common, "--labels", str(labels), "--cached-only"]) == 0

    result = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert len(server.requests) == asked and result["unanswered"] == 2
    assert [segment["translation"] for segment in result["segments"]] == [LABELS[0]["translation"]]
    assert "2 of the set's segments were not read back" in out.with_suffix(".md").read_text(encoding="utf-8")
