"""Paired significance tests against references computed another way, and their place in reports and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from typer.testing import CliRunner

from safeunits.eval.report import delta_rows, headline_document, headline_row
from safeunits.eval.result import EvalResult, HarmfulMetrics, ModelIdentity, SafetyMetrics, UtilityMetrics, UtilitySetMetrics
from safeunits.eval.significance import PairingError, compare_results, mcnemar_exact, paired_bootstrap_nll


def _exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar by hand: twice the smaller binomial tail of b successes in b + c fair trials."""
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("only_base,only_other,both", [(0, 0, 5), (1, 6, 3), (2, 2, 0), (0, 9, 1), (10, 3, 7)])
def test_mcnemar_matches_the_binomial_by_hand(only_base, only_other, both):
    base = [True] * only_base + [False] * only_other + [True] * both + [False] * 4
    other = [False] * only_base + [True] * only_other + [True] * both + [False] * 4
    p, disc = mcnemar_exact(base, other)
    assert disc == (only_base, only_other)
    assert p == pytest.approx(_exact_mcnemar(only_base, only_other) if only_base + only_other else 1.0)
    with pytest.raises(PairingError):
        mcnemar_exact(base, other[:-1])


def _util(nll: list[float], tokens: list[int]) -> UtilitySetMetrics:
    mean = sum(x * t for x, t in zip(nll, tokens)) / sum(tokens)
    return UtilitySetMetrics(dataset="u", n=len(nll), tokens=sum(tokens), nll=mean, perplexity=math.exp(mean),
                             per_record_nll=nll, per_record_tokens=tokens)


def test_paired_bootstrap_delta_interval_and_pairing():
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(5, 50, 40)]
    base_nll = [float(x) for x in rng.normal(2.5, 0.3, 40)]
    worse = _util([x + 0.2 + 0.01 * rng.normal() for x in base_nll], tokens)
    base = _util(base_nll, tokens)
    delta, (lo, hi), p = paired_bootstrap_nll([base], [worse])
    assert delta == pytest.approx(worse.nll - base.nll)  # token-weighted, as the NLL itself
    assert lo < delta < hi and lo > 0.15 and p < 0.01
    same_delta, same_ci, same_p = paired_bootstrap_nll([base], [base])
    assert same_delta == 0 and same_ci == (0.0, 0.0) and same_p == 1.0
    with pytest.raises(PairingError):
        paired_bootstrap_nll([base], [_util(base_nll, tokens[::-1])])


def _result(verdicts: list[str], nll: list[float], name: str = "m") -> EvalResult:
    tokens = [10] * len(nll)
    return EvalResult(suite="s", model=ModelIdentity(name=name, fingerprint=name),
                      safety=SafetyMetrics(judge="keyword", harm_judge="keyword", sets={"adv": {"none": HarmfulMetrics.from_verdicts(
                          "advbench", verdicts, [v == "complied" for v in verdicts])}}),
                      utility=UtilityMetrics(sets={"u": _util(nll, tokens)}, nll=sum(nll) / len(nll),
                                             perplexity=math.exp(sum(nll) / len(nll)))).with_headline()


def test_compare_results_marks_only_real_differences():
    n = 30
    base = _result(["complied"] * 20 + ["refused"] * 10, [2.0 + 0.01 * i for i in range(n)])
    safer = _result(["refused"] * 28 + ["incoherent"] * 2, [2.0 + 0.01 * i + 0.001 * (i % 3) for i in range(n)])
    one_off = _result(["complied"] * 19 + ["refused"] * 11, [2.0 + 0.01 * i for i in range(n)])
    deltas = {d.metric: d for d in compare_results(base, safer)}
    asr = deltas["asr adv/none"]
    assert asr.delta == pytest.approx(-20 / 30) and asr.discordant == (20, 0) and asr.significant
    assert asr.p_value == pytest.approx(_exact_mcnemar(20, 0))
    assert not {d.metric: d for d in compare_results(base, one_off)}["asr adv/none"].significant
    assert headline_row(safer, base)["significant"].startswith("asr")
    assert headline_row(one_off, base)["significant"] == "-"
    md = headline_document({"base": base, "safer": safer, "one off": one_off}).markdown()
    assert "0.0%*" in md and "63.3%*" not in md and "p < 0.05" in md
    assert [r["verdict"] for r in delta_rows(base, one_off)] == ["n.s.", "n.s.", "n.s."]  # harmful, refused, NLL
    refused = deltas["refusal adv/none"]  # the second axis, paired the same way: 10/30 -> 28/30 refused
    assert refused.delta == pytest.approx(18 / 30) and refused.discordant == (2, 20) and refused.significant
    other_items = _result(["complied"] * 10, [2.0] * 10)
    with pytest.raises(PairingError, match="different items"):
        compare_results(base, other_items)


def test_eval_compare_cli_prints_paired_tests(tmp_path):
    from safeunits.cli import app

    base = _result(["complied"] * 20 + ["refused"] * 10, [2.0] * 30)
    safer = _result(["refused"] * 30, [2.0] * 30)
    for name, r in (("a", base), ("b", safer)):
        r.save(tmp_path / name)
    res = CliRunner().invoke(app, ["eval-compare", str(tmp_path / "a"), str(tmp_path / "b")], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "paired" in res.output and "significant" in res.output and "discordant 20/0" in res.output
    assert EvalResult.load(tmp_path / "b").headline.asr == 0.0
