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
[piece.false_readings]
"keeps only the most likely entry" = ["only the most likely", "argmax"]
"stops before the entry that reaches p" = ["stops before", "excludes the entry that"]

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
    assert "[1/2] pick_top_p: recall 2/3, false readings 0/2, invented 0" in first_out.err
    assert "[2/2] pick_top_p_again: recall 2/2, false readings 0/0, invented 0" in first_out.err
    assert output["summary"]["false_mean"] == 0
    assert "| pick_top_p | 66.7% | keeps a running total until it reaches p | - | - |" in first_out.out

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


def test_a_false_reading_is_hit_by_its_phrase_in_the_prose_but_not_in_pasted_code(project, scripted_server, openai_env):
    server = scripted_server(
        scripted(
            intro="This function keeps **only the most likely** entries.",
            explanation="It sorts in descending order and draws at random.\n\n"
            "```python\nbreak  # stops before the entry that reaches p\n```",
        )
    )
    record = explain_and_score(project, server)
    assert record["false_readings"] == {
        "keeps only the most likely entry": "only the most likely",
        "stops before the entry that reaches p": None,  # only the pasted code said it
    }
    assert ev.false_hits(record) == {"keeps only the most likely entry": "only the most likely"}
    assert 'keeps only the most likely entry ("only the most likely")' in ev.pieces_table([record])
    assert ev.summarize([record])["false_mean"] == 1


def test_false_readings_are_counted_per_post_written(project):
    piece = ev.load_pieces(project / "pieces.toml")[0]
    wrong = {
        "false_readings": {
            "keeps only the most likely entry": "argmax",
            "stops before the entry that reaches p": "stops before",
        }
    }
    right = {
        "false_readings": {"keeps only the most likely entry": None, "stops before the entry that reaches p": None}
    }
    common = {"recall_pct": 100.0, "invented": [], "measured_on": None}
    failed = {**common, **right, "recall_pct": 0.0, "error": "empty answer"}
    summary = ev.summarize([{**common, **wrong}, {**common, **right}, failed])
    assert summary["false_mean"] == 1.0  # two posts written, 2 + 0 readings hit; the failed one is not a post
    assert (
        ev.score_prose(piece, "It picks the argmax.")["false_readings"]["keeps only the most likely entry"] == "argmax"
    )


@pytest.mark.parametrize(
    "table, why",
    [
        ('"a" = ["x"]\n"b" = ["y"]\n"c" = ["z"]\n"d" = ["w"]', "four readings"),
        ('"a" = []', "no phrase"),
        ('"a" = "x"', "a string, not a list"),
        ('"a" = ["x", "  "]', "a blank phrase"),
    ],
)
def test_a_malformed_false_reading_is_one_clear_error(tmp_path, table, why):
    path = tmp_path / "pieces.toml"
    path.write_text(
        '[[piece]]\nid = "x"\nfile = "a.py"\nsymbol = "f"\n[piece.points]\n"p" = ["p"]\n"q" = ["q"]\n'
        f"[piece.false_readings]\n{table}\n",
        encoding="utf-8",
    )
    with pytest.raises(ev.UserError, match="piece 1 \\(x\\): false_readings must be a table of 0 to 3 readings"):
        ev.load_pieces(path)


def test_a_piece_may_have_no_false_readings(project):
    assert ev.load_pieces(project / "pieces.toml")[1].false_readings == {}


def _old_record(**changes):
    """A piece's record as a results file written before false readings were scored holds it."""
    record = {
        "id": "pick_top_p",
        "file": "sampler.py",
        "symbol": "pick_top_p",
        "recall_pct": 33.3,
        "points": {"sorts": "sort"},
        "invented": [{"name": "numpy", "found_by": "must_not_invent"}],
        "prose": "It sorts the probabilities and keeps a running total, then takes the argmax.",
        "wall_s": 3.5,
        "tokens_in": 100,
        "tokens_out": 50,
        "requests": 2,
        "cache_hits": 0,
        "measured_on": "2026-12-01",
        "warnings": [],
    }
    return {**record, **changes}


def _old_run(records):
    summary = {"pieces": len(records), "failed": 0, "recall_pct": 33.3, "invented_mean": 1.0, "invented_max": 1}
    summary.update(measured=len(records), wall_s=3.5, tokens_in=100, tokens_out=50)
    return {"model": "old/model", "backend": "openai", "date": "2026-12-01", "summary": summary, "pieces": records}


def test_a_results_file_without_false_readings_shows_n_a():
    run = _old_run([_old_record()])
    assert "| old/model | openai | 1 | 0 | 33.3% | n/a | 1.00 | 1 | n/a | 3.5 | 100 | 50 |" in ev.models_table([run])
    assert "| pick_top_p | 33.3% | - | n/a | `numpy` |" in ev.pieces_table(run["pieces"])
    assert ev.summarize(run["pieces"])["false_mean"] is None
    assert ev.summarize(run["pieces"])["off_piece"] is None  # not counted then, not zero


def test_rescore_scores_the_stored_prose_again_and_keeps_the_rest(project, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    gone = _old_record(id="a_piece_since_removed", recall_pct=50.0)
    failed = _old_record(
        id="pick_top_p_again", error="empty answer", recall_pct=0.0, points={"sorts": None}, invented=[]
    )
    del failed["prose"]
    (results / "eval_old_model.json").write_text(json.dumps(_old_run([_old_record(), failed, gone])), encoding="utf-8")
    monkeypatch.setattr(ev, "EVAL_SET", project / "pieces.toml")
    monkeypatch.setattr(ev, "RESULTS", results)

    assert ev.main(["--rescore"]) == 0
    rescored = json.loads((results / "eval_old_model.json").read_text(encoding="utf-8"))
    first, again, kept = rescored["pieces"]
    assert first["recall_pct"] == pytest.approx(66.7)  # sort and running total, against the eval set of now
    assert first["points"]["keeps a running total until it reaches p"] == "running total"
    assert first["false_readings"] == {
        "keeps only the most likely entry": "argmax",
        "stops before the entry that reaches p": None,
    }
    assert list(first)[list(first).index("points") + 1] == "false_readings"
    assert first["invented"] == [{"name": "numpy", "found_by": "must_not_invent"}]  # as stored
    assert first["wall_s"] == 3.5 and first["measured_on"] == "2026-12-01"
    assert again["recall_pct"] == 0.0 and again["points"] == {"sorts": None, "draws at random": None}
    assert kept == gone  # not in the eval set any more: left as it was
    assert rescored["summary"]["false_mean"] == 1  # one post written and scored, one reading hit
    assert rescored["date"] == "2026-12-01" and "rescored" in rescored
    out = capsys.readouterr()
    # recall averages all three records; false readings and invented names are per post written
    assert "| old/model | openai | 3 | 1 | 38.9% | 1 | 1 |" in out.out
    assert "rescored benchmarks" not in out.err and "eval_old_model.json: recall 33.3% ->" in out.err
    assert "kept as they were: a_piece_since_removed" in out.err


def test_rescore_asks_no_model():
    with pytest.raises(SystemExit):
        ev.parse_args(["--rescore", "--backend", "local"])


def test_every_shipped_piece_has_false_readings_that_no_point_lists():
    for piece in ev.load_pieces(ev.EVAL_SET):
        assert 1 <= len(piece.false_readings) <= 3, piece.id
        alternatives = {a.lower() for phrases in piece.points.values() for a in phrases}
        for claim, phrases in piece.false_readings.items():
            assert not alternatives & {p.lower() for p in phrases}, f"{piece.id}: {claim}"


def test_an_answer_that_restates_the_docstring_is_asked_again_and_counted(project, scripted_server, openai_env):
    restated = "It samples an index from the smallest set of entries whose probabilities reach p."
    fixed = "It sorts the indices by probability, keeps a running `total` until it reaches `p`, then picks at random."

    def script(body):
        prompt = user_text(body)
        if "title" in prompt:
            return f"{TITLE}\n\nThis function samples an index."
        return fixed if "An earlier answer" in prompt else restated

    record = explain_and_score(project, scripted_server(script))
    assert record["asked_again"] == 1 and record["off_piece"] == []  # the second answer was about the code
    assert record["points"]["keeps a running total until it reaches p"] == "running total"

    stubborn = scripted_server(scripted(intro="This function samples an index.", explanation=restated))
    record = explain_and_score(project, stubborn)
    assert record["asked_again"] == 1 and len(record["off_piece"]) == 1 and "restates" in record["off_piece"][0]
    assert ev.summarize([record])["off_piece"] == 1
