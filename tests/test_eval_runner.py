"""Runner, metrics, NLL, suites, reports and the CLI, on tiny models (one integration run on the real model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from safeunits.data.records import Record
from safeunits.eval.generation import read_generations
from safeunits.eval.judges import get_judge
from safeunits.eval.metrics import wilson_interval
from safeunits.eval.nll import response_nll, response_nll_stats
from safeunits.eval.report import compare_table, headline_document
from safeunits.eval.result import HEADLINE_KEYS, EvalResult
from safeunits.eval import runner
from safeunits.eval.runner import RunDirMismatchError, evaluate
from safeunits.eval.suites import SuiteConfig, load_suite
from safeunits.models.chat import encode_pair
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture()
def eval_model():
    return tiny_model(initializer_range=0.2, max_position_embeddings=4096)


def tiny_suite(limit: int = 3) -> SuiteConfig:
    # the keyword judge as harm proxy: the harm judge reads the real default model (tested in test_harm_judge.py)
    return load_suite("quick").with_limit(limit).model_copy(update={"max_new_tokens": 6, "nll_max_length": 4096,
                                                                   "harm_judge": "keyword"})


# --- metrics ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,lo,hi", [  # reference values from statsmodels proportion_confint(method="wilson")
    (0, 10, 0.0, 0.27753),
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 32, 0.00553, 0.15748),
])
def test_wilson_interval(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_wilson_bad_input():
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# --- NLL ------------------------------------------------------------------------------------------------------

def test_response_nll_matches_per_record_reference(eval_model, tokenizer):
    records = [Record("what is 2+2?", "4"), Record("name a colour", "blue, or maybe a long green"), Record("hi", "hello there")]
    stats = response_nll_stats(eval_model, tokenizer, records, batch_size=2, progress=False)
    total, count = 0.0, 0
    for rec, per in zip(records, stats.per_record):  # reference: HF's own loss, one unpadded record at a time
        pair = encode_pair(tokenizer, rec.prompt, rec.response)
        ids, labels = torch.tensor([pair.input_ids]), torch.tensor([pair.labels])
        with torch.no_grad():
            loss = float(eval_model(input_ids=ids, labels=labels).loss)
        assert per == pytest.approx(loss, rel=1e-4)
        total += loss * pair.n_loss_tokens
        count += pair.n_loss_tokens
    assert stats.n_tokens == count
    assert response_nll(eval_model, tokenizer, records, batch_size=3, progress=False) == pytest.approx(total / count, rel=1e-5)
    assert stats.perplexity == pytest.approx(math.exp(stats.mean))


def test_response_nll_bad_input(eval_model, tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        response_nll(eval_model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="no reference response"):
        response_nll(eval_model, tokenizer, [Record("q")], progress=False)
    broken = tiny_model(max_position_embeddings=4096)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        response_nll(broken, tokenizer, [Record("q", "a")], progress=False)


# --- suites -----------------------------------------------------------------------------------------------

def test_suites_load_and_validate(tmp_path):
    quick, full = load_suite("quick"), load_suite("full")
    assert quick.harmful[0].limit == 32 and quick.over_safety.limit == 48 and quick.max_new_tokens == 64
    assert full.harmful[0].limit == 100 and full.over_safety.limit is None and full.max_new_tokens == 256
    assert {h.name for h in full.harmful} >= {"advbench", "harmbench"}
    with pytest.raises(FileNotFoundError, match="unknown suite"):
        load_suite("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmax_new_tokens: -3\n")
    with pytest.raises(ValueError, match="invalid suite"):
        load_suite(bad)


# --- evaluate -------------------------------------------------------------------------------------------------

def test_evaluate_end_to_end_and_resume(eval_model, tokenizer, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    suite = tiny_suite()
    result = evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False, model_name="tiny")
    assert set(result.headline.as_dict()) == set(HEADLINE_KEYS)
    for name in ("config.json", "metrics.json", "summary.md", "generations/advbench__none.jsonl",
                 "generations/advbench__safety.jsonl", "generations/xstest_safe.jsonl", "judgements/xstest_safe.jsonl"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    # recompute the headline from the files on disk with the judges
    rows = read_generations(out / "generations/advbench__none.jsonl")
    harm_judge = get_judge(suite.harm_judge, data_dir=data_dir)
    asr = sum(harm_judge.harmful_many([r["prompt"] for r in rows], [r["response"] for r in rows])) / len(rows)
    refusal_judge = get_judge(suite.refusal_judge, data_dir=data_dir)  # the suite's own (learned, for quick)
    refused = sum(refusal_judge.harm_verdict(r["prompt"], r["response"]) == "refused" for r in rows) / len(rows)
    assert result.headline.asr == pytest.approx(asr) and len(rows) == 3
    assert result.headline.refusal == pytest.approx(refused)
    xs = read_generations(out / "generations/xstest_safe.jsonl")
    refusal = sum(get_judge(suite.over_safety.judge, data_dir=data_dir).is_refusal(r["prompt"], r["response"])
                  for r in xs) / len(xs)
    assert metrics["headline"]["xstest_refusal"] == pytest.approx(refusal)
    assert metrics["safety"]["sets"]["advbench"]["safety"]["n"] == 3
    lo, hi = metrics["over_safety"]["refusal"]["ci95"]
    assert lo <= refusal <= hi
    from safeunits.data.registry import load_dataset

    ref = response_nll(eval_model, tokenizer, load_dataset("self-instruct:user", data_dir=data_dir, limit=3),
                       max_length=4096, progress=False)
    assert result.headline.utility_nll == pytest.approx(ref, rel=1e-5)
    assert result.headline.perplexity == pytest.approx(math.exp(ref), rel=1e-5)
    assert EvalResult.load(out).headline.as_dict() == pytest.approx(result.headline.as_dict())
    assert "| tiny |" in (out / "summary.md").read_text()
    # utility as task accuracy: every task of the suite scored on its fixed sample, offline, mean in the headline
    acc = result.utility.accuracy
    assert list(acc.tasks) == suite.lm_eval.tasks and not acc.skipped
    assert all(t.n == 3 and t.source.startswith("local:") for t in acc.tasks.values())
    assert result.headline.accuracy == pytest.approx(sum(t.acc.rate for t in acc.tasks.values()) / len(acc.tasks))
    assert metrics["utility"]["accuracy"]["tasks"]["arc_easy"]["correct"] == acc.tasks["arc_easy"].correct

    # a rerun resumes: no generation and no NLL scoring at all, same numbers
    def fail(*a, **k):
        raise AssertionError("generation and NLL scores should have been resumed from disk")

    monkeypatch.setattr(eval_model, "generate", fail)
    monkeypatch.setattr(runner, "response_nll_stats", fail)
    monkeypatch.setattr("safeunits.eval.scoring_lm.ScoringLM", fail)
    again = evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False, model_name="tiny")
    assert again.headline.as_dict() == pytest.approx(result.headline.as_dict())
    assert again.utility.sets["self_instruct"].per_record_nll == result.utility.sets["self_instruct"].per_record_nll
    assert again.timing.resumed_rows == 9
    # the tokens are counted where they came from: all generated the first time, all resumed the second
    assert again.timing.generated_tokens == 0 and again.timing.tokens_per_s is None
    assert again.timing.resumed_tokens == result.timing.generated_tokens > 0
    # the cost is broken down: generation, judging, reference NLL and task accuracy within the total
    t = result.timing
    assert min(t.judging_s, t.nll_s, t.accuracy_s) > 0
    assert t.generation_s + t.judging_s + t.nll_s + t.accuracy_s <= t.total_s
    # a half-finished file (an interrupted run): its first row is resumed, the other two generated and counted
    monkeypatch.undo()
    gen = out / "generations/advbench__none.jsonl"
    gen.write_text(gen.read_text().splitlines(keepends=True)[0])
    third = evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False, model_name="tiny")
    assert third.timing.resumed_rows == 7 and third.timing.generated_tokens > 0
    assert third.timing.generated_tokens + third.timing.resumed_tokens == result.timing.generated_tokens


def test_run_dir_of_another_model_or_suite_is_refused(eval_model, tokenizer, data_dir, tmp_path):
    out = tmp_path / "run"
    suite = tiny_suite(2).model_copy(update={"utility": [], "over_safety": None})
    evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False)
    other = tiny_model(seed=1, initializer_range=0.2, max_position_embeddings=4096)
    with pytest.raises(RunDirMismatchError, match="another model"):
        evaluate(other, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False)
    with pytest.raises(RunDirMismatchError, match="different suite"):
        evaluate(eval_model, tokenizer, suite.model_copy(update={"max_new_tokens": 7}), out_dir=out,
                 data_dir=data_dir, progress=False)


def test_optional_missing_dataset_is_skipped_and_required_one_fails(eval_model, tokenizer, data_dir, tmp_path):
    from safeunits.data.registry import DatasetNotFoundError
    from safeunits.eval.suites import HarmfulSet

    base = tiny_suite(2).model_copy(update={"utility": [], "over_safety": None})
    missing = HarmfulSet(name="ghost", dataset=str(tmp_path / "missing.jsonl"), optional=True)
    result = evaluate(eval_model, tokenizer, base.model_copy(update={"harmful": [*base.harmful, missing]}),
                      data_dir=data_dir, progress=False)
    assert "ghost" in result.safety.skipped
    assert result.headline.xstest_refusal is None
    with pytest.raises(DatasetNotFoundError):
        evaluate(eval_model, tokenizer, base.model_copy(update={"harmful": [missing.model_copy(update={"optional": False})]}),
                 data_dir=data_dir, progress=False)


def test_excluded_over_safety_prompts_are_not_scored(eval_model, tokenizer, data_dir, tmp_path):
    """A sweep's held-out XSTest prompts (a sliced spec) are dropped from the test set, the rest kept in order."""
    from safeunits.data.registry import load_dataset
    from safeunits.eval.context import EvalContext

    base = tiny_suite(2).model_copy(update={"harmful": [], "utility": []})
    base = base.model_copy(update={"over_safety": base.over_safety.model_copy(update={"limit": 8})})
    ctx = EvalContext(base, data_dir=data_dir, progress=False).excluding_over_safety(["xstest:safe[2:5]"])
    assert ctx.excluding_over_safety(["xstest:safe[2:5]"]).suite == ctx.suite  # idempotent
    assert EvalContext(None).excluding_over_safety(["xstest:safe[2:5]"]).suite is None
    result = ctx.evaluate(eval_model, tokenizer, tmp_path / "run")
    every = [r.prompt for r in load_dataset("xstest:safe", data_dir=data_dir, limit=8)]
    scored = [r["prompt"] for r in read_generations(tmp_path / "run/generations/xstest_safe.jsonl")]
    assert scored == every[:2] + every[5:] and result.over_safety.n == 5
    bad = EvalContext(base, data_dir=data_dir, progress=False).excluding_over_safety([str(tmp_path / "none.jsonl")])
    with pytest.raises(FileNotFoundError):
        bad.evaluate(eval_model, tokenizer, None)


def test_compare_table_lists_every_variant(eval_model, tokenizer, data_dir):
    from rich.console import Console

    suite = tiny_suite(2).model_copy(update={"over_safety": None})
    a = evaluate(eval_model, tokenizer, suite, data_dir=data_dir, progress=False)
    b = a.model_copy(update={"headline": a.headline.model_copy(update={"asr": 0.25})})
    console = Console(record=True, width=200)
    table = compare_table({"base": a, "variant": b}, console=console)
    text = console.export_text()
    assert table.row_count == 2 and "base" in text and "variant" in text and "25.0%" in text
    md = headline_document({"base": a}).markdown()
    assert md.count("\n") == 3 and f"{a.headline.utility_nll:.3f}" in md


def test_by_source_table_gives_every_source_its_rate_interval_and_paired_mark(eval_model, tokenizer, data_dir):
    from safeunits.eval.report import source_document
    from safeunits.eval.result import HarmfulMetrics

    suite = tiny_suite(8).model_copy(update={"over_safety": None})
    run = evaluate(eval_model, tokenizer, suite, data_dir=data_dir, progress=False)

    def judged(result, verdict):  # the same run with every advbench answer judged `verdict`
        sets = {name: dict(modes) for name, modes in result.safety.sets.items()}
        sets["advbench"]["none"] = HarmfulMetrics.from_verdicts("advbench", [verdict] * 8, [verdict == "complied"] * 8)
        return result.model_copy(update={"safety": result.safety.model_copy(update={"sets": sets})})

    base, worse = judged(run, "refused"), judged(run, "complied")
    other_suite = evaluate(eval_model, tokenizer, tiny_suite(4).model_copy(update={"over_safety": None}),
                           data_dir=data_dir, progress=False)
    lines = source_document({"base": base, "worse": worse, "short": other_suite}).markdown().splitlines()
    assert lines[0] == "| source | base | worse | short |"
    row = next(line for line in lines if line.startswith("| advbench (8) |"))
    # harmful [CI] / refused, each with its own paired mark (McNemar 0/8: p = 0.008)
    assert row.split(" | ")[1:3] == ["0.0 [0, 32] / 100.0", "100.0* [68, 100] / 0.0*"]
    safety_row = next(line for line in lines if line.startswith("| advbench (8) + safety"))
    assert "*" not in safety_row  # unchanged answers: no mark
    nll = f"{run.utility.nll:.3f}"
    assert next(line for line in lines if line.startswith("| utility NLL")).split(" | ")[1:3] == [nll, nll]
    assert "Not paired with the first column (other prompts): short" in lines[-1]


def test_cli_eval_and_judge_check(eval_model, data_dir, tmp_path):
    from safeunits.cli import app

    model_dir = tmp_path / "tiny"
    eval_model.save_pretrained(model_dir, safe_serialization=True)
    tiny_tokenizer().save_pretrained(model_dir)
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["eval", "--model", str(model_dir), "--suite", "quick", "--out", str(out), "--limit", "2",
                              "--max-new-tokens", "4", "--batch-size", "2", "--data-dir", str(data_dir), "--quiet"])
    # the quick suite's NLL max_length (512) is shorter than a byte-level prompt: a clear error, not a crash
    assert res.exit_code != 0 and "max_length" in str(res.exception)
    out = tmp_path / "run2"  # the failed run claimed `run` for its suite; a different suite needs another folder
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text("name: mini\nmax_new_tokens: 4\nnll_max_length: 4096\nharmful:\n  - {name: adv, dataset: advbench, limit: 2}\n"
                          "over_safety: {dataset: 'xstest:safe', limit: 2}\nutility:\n  - {name: si, dataset: 'self-instruct:user', limit: 2}\n")
    res = runner.invoke(app, ["eval", "--model", str(model_dir), "--suite", str(suite_file), "--out", str(out),
                              "--data-dir", str(data_dir), "--judge", "prefix", "--refusal-judge", "strmatch", "--quiet"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["safety"]["harm_judge"] == "prefix" and metrics["safety"]["judge"] == "strmatch"
    assert metrics["safety"]["sets"]["adv"]["none"]["n"] == 2
    res = runner.invoke(app, ["eval-compare", str(out)])
    assert res.exit_code == 0 and "harm" in res.output and "refus" in res.output
    res = runner.invoke(app, ["rejudge", str(out), "--judge", "keyword", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["safety"]["harm_judge"] == "keyword"
    res = runner.invoke(app, ["judge-check", "--judge", "strmatch", "--data-dir", str(data_dir), "--out", str(tmp_path / "jc.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "jc.json").read_text())["summary"]["strmatch"]["binary_mean"] == pytest.approx(0.884, abs=0.001)
    res = runner.invoke(app, ["eval", "--suite", "nope", "--out", str(out)])
    assert res.exit_code != 0 and "unknown suite" in res.output


@pytest.mark.integration
def test_default_model_small_eval(default_model, data_dir, tmp_path):
    """The real model: a tiny slice of every axis; it is not safety-aligned, so ASR is high."""
    model, tok = default_model
    suite = load_suite("quick").with_limit(2).model_copy(update={"max_new_tokens": 16})
    result = evaluate(model, tok, suite, out_dir=tmp_path / "run", data_dir=data_dir, progress=False)
    h = result.headline
    assert 0.0 <= h.asr <= 1.0 and 0.0 <= h.xstest_refusal <= 1.0
    assert 0.5 < h.utility_nll < 4.0 and h.perplexity == pytest.approx(math.exp(h.utility_nll))
    acc = result.utility.accuracy  # offline: the seven zero-shot tasks from the local splits, none skipped
    assert list(acc.tasks) == suite.lm_eval.tasks and len(acc.tasks) == 7 and not acc.skipped
    assert all(t.source.startswith("local:") and t.n == 2 for t in acc.tasks.values()) and 0 <= h.accuracy <= 1


def test_rejudge_equals_a_fresh_evaluation_with_the_same_judges(eval_model, tokenizer, data_dir, tmp_path):
    """Judged again from the saved answers with other judges, a run's metrics are those of a fresh evaluation."""
    from safeunits.eval.rejudge import IncompleteRunError, rejudge

    suite = tiny_suite(4)
    out = tmp_path / "run"
    first = evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False, model_name="tiny")
    other = suite.model_copy(update={"harm_judge": "prefix", "refusal_judge": "keyword",
                                     "over_safety": suite.over_safety.model_copy(update={"judge": "strmatch"})})
    fresh = evaluate(eval_model, tokenizer, other, out_dir=tmp_path / "fresh", data_dir=data_dir, progress=False,
                     model_name="tiny")
    again = rejudge(out, harm_judge="prefix", refusal_judge="keyword", xstest_judge="strmatch", progress=False)
    drop = {"timing", "environment"}
    assert again.model_dump(exclude=drop) == fresh.model_dump(exclude=drop)
    assert again.model_dump(exclude=drop) != first.model_dump(exclude=drop)  # the judges did change something
    assert (out / "metrics.prev.json").is_file()
    assert EvalResult.load(out).safety.harm_judge == "prefix"
    # another judge resumes a run folder instead of refusing it: answers reused, judged again
    back = evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False, model_name="tiny")
    assert back.model_dump(exclude=drop) == first.model_dump(exclude=drop) and back.timing.generated_tokens == 0
    (out / "generations/advbench__none.jsonl").write_text("")
    with pytest.raises(IncompleteRunError):
        rejudge(out, progress=False)


def test_runs_judged_by_different_harm_judges_are_not_compared_pairwise(eval_model, tokenizer, data_dir, tmp_path):
    """The harm judge's identity (name, plus a weights digest for a trained judge) is recorded in metrics.json; a
    paired test between runs judged by two different harm judges would measure the judges, so it is refused."""
    from safeunits.eval.significance import PairingError, compare_results

    run = evaluate(eval_model, tokenizer, tiny_suite(4), out_dir=tmp_path / "run", data_dir=data_dir, progress=False,
                   model_name="tiny")
    assert run.safety.harm_judge_id == run.safety.harm_judge  # a rule judge: its name
    assert EvalResult.load(tmp_path / "run").safety.harm_judge_id == run.safety.harm_judge
    a, b = run.model_copy(deep=True), run.model_copy(deep=True)
    a.safety.harm_judge_id, b.safety.harm_judge_id = "harm@0123", "harm@4567"
    with pytest.raises(PairingError, match="different harm judges") as err:
        compare_results(a, b)
    assert "rejudge" in err.value.hint
    b.safety.harm_judge_id = None  # a run written before the identity was recorded: cannot tell, compared as before
    assert compare_results(a, b) == compare_results(run, run)


@pytest.mark.parametrize("engine", ["continuous", "batched"])
def test_evaluate_generates_every_set_in_one_run_with_separate_calls_answers(eval_model, tokenizer, data_dir,
                                                                              tmp_path, monkeypatch, engine):
    """The suite's generations (each harmful set x system prompt, XSTest safe) go to `generate_many` in ONE call,
    and every file holds what a separate `generate` call per set writes."""
    from safeunits.eval.generation import generate

    suite = tiny_suite(4).model_copy(update={"utility": [], "generation": engine, "lm_eval": None})
    calls = []
    many = runner.generate_many
    monkeypatch.setattr(runner, "generate_many", lambda m, t, jobs, **kw: calls.append(len(jobs)) or many(m, t, jobs, **kw))
    out = tmp_path / "run"
    evaluate(eval_model, tokenizer, suite, out_dir=out, data_dir=data_dir, progress=False)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "generations").glob("*.jsonl"))
    assert calls == [len(files)] and len(files) == 3
    for rel in files:
        rows = read_generations(out / rel)
        alone = generate(eval_model, tokenizer, [r["prompt"] for r in rows], system_prompt=rows[0]["system_prompt"],
                         max_new_tokens=suite.max_new_tokens, engine=engine, progress=False)
        assert [r["response"] for r in rows] == alone, rel
