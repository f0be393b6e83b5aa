"""benchmarks/eval_explain.py without a model: the scorer on hand-written explanations, served by
a scripted OpenAI-compatible server through the real pipeline, and the shipped eval set's sanity."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
from scripted_server import user_text

from explainer.backends.openai import OpenAIBackend
from explainer.chunking import chunk_file

ROOT = Path(__file__).resolve().parent.parent


def _load_runner():
    # benchmarks/ is not a package; registering the module first lets its dataclasses resolve.
    spec = importlib.util.spec_from_file_location("eval_explain", ROOT / "benchmarks" / "eval_explain.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ev = _load_runner()

SOURCE = '''\
import random


def pick_top_p(probs, p):
    """Sample an index from the smallest set of entries whose probabilities reach p."""
    order = sorted(range(len(probs)), key=lambda i: probs[i], reverse=True)
    kept, total = [], 0.0
    for index in order:
        kept.append(index)
        total += probs[index]
        if total >= p:
            break
    return random.choice(kept)
'''

PIECE_TOML = """\
[[piece]]
id = "pick_top_p"
file = "sampler.py"
symbol = "pick_top_p"
must_not_invent = ["numpy", "torch.multinomial"]
[piece.points]
"sorts the probabilities, largest first" = ["sort", "descending"]
"keeps a running total until it reaches p" = ["cumulative", "running total"]
"draws one of the kept entries at random" = ["multinomial", "random"]

[[piece]]
id = "pick_top_p_again"
file = "sampler.py"
symbol = "pick_top_p"
[piece.points]
"sorts" = ["sort"]
"draws at random" = ["random"]
"""

TITLE = "# Top-p sampling by hand"


def scripted(intro: str, explanation: str):
    """A server script: the introduction request gets TITLE and `intro`, the chunk request `explanation`."""

    def script(body):
        return f"{TITLE}\n\n{intro}" if "title" in user_text(body) else explanation

    return script


@pytest.fixture
def project(tmp_path):
    """A one-file project and an eval set for it."""
    (tmp_path / "sampler.py").write_text(SOURCE, encoding="utf-8")
    (tmp_path / "pieces.toml").write_text(PIECE_TOML, encoding="utf-8")
    return tmp_path


def explain_and_score(project, server):
    piece = ev.load_pieces(project / "pieces.toml")[0]
    backend = OpenAIBackend(model="scripted", base_url=server.base_url)
    return ev.evaluate_piece(piece, backend, None, max_lines=30, root=project)


def test_mentions_matches_alternatives_from_the_start_of_a_word_ignoring_case_and_line_breaks():
    assert ev.mentions("It Sorted the list.", "sort")
    assert ev.mentions("a running\n   total", "Running Total")
    assert ev.mentions("returns -1 when absent", "-1")
    assert not ev.mentions("a cheap trick", "heap")  # inside a longer word
    assert not ev.mentions("it sums them", "cumulative")


def test_prose_leaves_out_code_blocks_and_markup_but_keeps_inline_code():
    markdown = "It **sorts** the `probs`.\n\n```python\nrandom.choice(kept)\n```\n\n    indented = code\n"
    assert ev.prose_of(markdown) == "It sorts the probs."


def test_recall_counts_a_point_hit_by_any_alternative_and_reports_the_missed_one(project, scripted_server, openai_env):
    server = scripted_server(
        scripted(
            intro="This function samples an index.",
            explanation="It orders the indices in **descending** order of probability, then returns "
            "one of the kept ones chosen at random.\n\n```python\ntotal += probs[index]  # cumulative\n```",
        )
    )
    record = explain_and_score(project, server)
    assert record["points"] == {
        "sorts the probabilities, largest first": "descending",
        "keeps a running total until it reaches p": None,  # only the pasted code said it
        "draws one of the kept entries at random": "random",
    }
    assert record["recall_pct"] == pytest.approx(66.7)
    assert record["invented"] == []
    assert "error" not in record


def test_invented_names_come_from_the_grounding_check_and_the_must_not_invent_list(
    project, scripted_server, openai_env
):
    server = scripted_server(
        scripted(
            intro="Like `np.random.choice`, it samples from the most likely `probs`.",
            explanation="It sorts with `sorted` and keeps a running total in `total`, then calls "
            "`random.choice`; NumPy could do this too, and `top_p_mask` is never built.",
        )
    )
    record = explain_and_score(project, server)
    names = {entry["name"]: entry["found_by"] for entry in record["invented"]}
    # np.random.choice: in the introduction, checked here against the whole file; top_p_mask: flagged
    # by explain_file's own check of the chunk; numpy: a must_not_invent name, said without backticks.
    assert names == {"top_p_mask": "grounding check", "np.random.choice": "grounding check", "numpy": "must_not_invent"}
    assert record["recall_pct"] == 100.0


def test_a_failed_explanation_scores_zero_and_keeps_the_error(project, scripted_server, openai_env):
    server = scripted_server(lambda body: "")  # an empty answer is unusable
    record = explain_and_score(project, server)
    assert record["recall_pct"] == 0.0 and record["invented"] == []
    assert "empty answer" in record["error"]
    summary = ev.summarize([record])
    assert summary["failed"] == 1 and summary["invented_mean"] is None


def test_the_runner_writes_json_and_tables_and_a_rerun_comes_from_the_cache(
    project, tmp_path, scripted_server, openai_env, monkeypatch, capsys
):
    server = scripted_server(scripted(intro="It samples.", explanation="It sorts, then picks at random."))
    monkeypatch.setattr(ev, "ROOT", project)
    monkeypatch.setattr(ev, "EVAL_SET", project / "pieces.toml")
    monkeypatch.setattr(ev, "RESULTS", tmp_path / "results")
    args = [
        "--backend",
        "openai",
        "--base-url",
        server.base_url,
        "--model",
        "scripted/model",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]

    assert ev.main(args) == 0
    output = json.loads((tmp_path / "results" / "eval_scripted_model.json").read_text(encoding="utf-8"))
    first_out = capsys.readouterr()
    assert output["summary"]["pieces"] == 2 and output["summary"]["failed"] == 0
    assert [r["recall_pct"] for r in output["pieces"]] == [pytest.approx(66.7), 100.0]
    assert "| scripted/model | openai | 2 | 0 | 83.3% |" in first_out.out
    assert "[2/2] pick_top_p_again: recall 2/2, invented 0" in first_out.err

    asked = len(server.requests)
    assert ev.main([*args, "--pieces", "1"]) == 0
    assert len(server.requests) == asked  # every answer came from the cache
    rerun = json.loads((tmp_path / "results" / "eval_scripted_model.json").read_text(encoding="utf-8"))
    assert rerun["summary"]["pieces"] == 1
    # The model took no time in the rerun; the earlier run's measurements stand for it.
    assert {k: rerun["pieces"][0][k] for k in ("wall_s", "tokens_out", "measured_on")} == {
        k: output["pieces"][0][k] for k in ("wall_s", "tokens_out", "measured_on")
    }
    assert "from cache" in capsys.readouterr().err


def test_the_eval_set_is_well_formed_and_every_symbol_exists():
    pieces = ev.load_pieces(ev.EVAL_SET)
    assert len(pieces) >= 20
    code_languages = set()
    for piece in pieces:
        chunked = chunk_file(ROOT / piece.file, piece.symbol, display_path=piece.file)  # raises if the symbol went
        code_languages.add(chunked.code_language)
        lines = sum(c.end_line - c.start_line + 1 for c in chunked.chunks)
        assert 8 <= lines <= 40, f"{piece.id}: {lines} lines"
    assert code_languages == {"python", "c"}


def test_a_malformed_eval_set_is_one_clear_error(tmp_path):
    path = tmp_path / "pieces.toml"
    path.write_text(
        textwrap.dedent("""\
        [[piece]]
        id = "x"
        file = "a.py"
        symbol = "f"
        [piece.points]
        "only one point" = ["word"]
        """),
        encoding="utf-8",
    )
    with pytest.raises(ev.UserError, match="piece 1 \\(x\\): needs 2 to 4 points"):
        ev.load_pieces(path)
