"""Is a difference between two evaluations real? Paired tests on the same prompts.

Two runs of one suite judge the same prompts, so differences are tested pairwise: rates with the exact McNemar
test (a two-sided binomial test on the discordant pairs, scipy), the utility NLL with a paired bootstrap over
records (token-weighted means, as the NLL itself). Small eval sets make most one- or two-prompt differences noise;
these tests say which are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy.stats import binomtest

from safeunits.errors import UserValueError
from safeunits.eval.result import AccuracyMetrics, EvalResult, UtilitySetMetrics

ALPHA = 0.05
UTILITY_ALL = "nll (all sets)"
ACCURACY_ALL = "acc (mean over tasks)"


class PairedDelta(BaseModel):
    """One metric of `other` against `base` on the same items."""

    metric: str = Field(description="e.g. 'asr advbench/none', 'xstest_refusal', 'nll self_instruct'")
    kind: str = Field(description="'rate' (McNemar exact) or 'nll' (paired bootstrap)")
    n: int
    base: float
    other: float
    delta: float = Field(description="other - base")
    p_value: float
    ci95: tuple[float, float] | None = Field(None, description="bootstrap interval of the delta (nll only)")
    discordant: tuple[int, int] | None = Field(None, description="(items only base hit, items only other hit)")

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


class PairingError(UserValueError):
    """The two runs did not judge the same items, so a paired test would be meaningless."""


def mcnemar_exact(base: Sequence[bool], other: Sequence[bool]) -> tuple[float, tuple[int, int]]:
    """Two-sided exact McNemar p-value of paired binary outcomes, and the discordant counts."""
    if len(base) != len(other):
        raise PairingError(f"{len(base)} vs {len(other)} paired outcomes")
    only_base = sum(1 for a, b in zip(base, other) if a and not b)
    only_other = sum(1 for a, b in zip(base, other) if b and not a)
    n = only_base + only_other
    p = 1.0 if n == 0 else float(binomtest(only_other, n, 0.5).pvalue)
    return p, (only_base, only_other)


def paired_bootstrap_nll(base: Sequence[UtilitySetMetrics], other: Sequence[UtilitySetMetrics], *,
                         n_boot: int = 2000, seed: int = 0) -> tuple[float, tuple[float, float], float]:
    """Delta of token-weighted mean NLL over the sets (other - base), its 95 % bootstrap interval and a two-sided
    p-value. Records are resampled together in both runs (pairing); each weighs its response tokens."""
    tokens_b = [t for s in base for t in s.per_record_tokens]
    if tokens_b != [t for s in other for t in s.per_record_tokens]:
        raise PairingError("the utility sets differ in their records (token counts do not match)")
    tokens = np.asarray(tokens_b, dtype=np.float64)
    nll_b = np.asarray([x for s in base for x in s.per_record_nll])
    nll_o = np.asarray([x for s in other for x in s.per_record_nll])
    diff_sum = (nll_o - nll_b) * tokens
    delta = float(diff_sum.sum() / tokens.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tokens), size=(n_boot, len(tokens)))
    boots = diff_sum[idx].sum(1) / tokens[idx].sum(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    p = min(1.0, 2 * min(float((boots <= 0).mean()), float((boots >= 0).mean())))
    return delta, (float(lo), float(hi)), p


def paired_bootstrap_task_mean(base: Sequence[Sequence[bool]], other: Sequence[Sequence[bool]], *, n_boot: int = 2000,
                               seed: int = 0) -> tuple[float, tuple[float, float], float]:
    """Delta of the unweighted mean accuracy over tasks (other - base), its 95 % bootstrap interval and a two-sided
    p-value: documents are resampled within each task, together in both runs (pairing)."""
    rng = np.random.default_rng(seed)
    deltas, boots = [], np.zeros(n_boot)
    for b, o in zip(base, other):
        diff = np.asarray(o, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        deltas.append(diff.mean())
        boots += diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
    boots /= len(base)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    p = min(1.0, 2 * min(float((boots <= 0).mean()), float((boots >= 0).mean())))
    return float(np.mean(deltas)), (float(lo), float(hi)), p


def accuracy_deltas(base: AccuracyMetrics, other: AccuracyMetrics) -> list[PairedDelta]:
    """Zero-shot accuracy per task (McNemar exact on the same documents) and its mean over the shared tasks."""
    shared = [t for t in base.tasks if t in other.tasks]
    deltas = []
    for task in shared:
        b, o = base.tasks[task], other.tasks[task]
        if b.doc_ids != o.doc_ids or b.source != o.source:
            raise PairingError(f"acc {task}: the runs scored different documents ({b.source} n={b.n} vs {o.source} "
                               f"n={o.n}); compare runs of the same suite")
        p, disc = mcnemar_exact(b.correct, o.correct)
        deltas.append(PairedDelta(metric=f"acc {task}", kind="rate", n=b.n, base=b.acc.rate, other=o.acc.rate,
                                  delta=o.acc.rate - b.acc.rate, p_value=p, discordant=disc))
    if len(shared) > 1:
        delta, ci, p = paired_bootstrap_task_mean([base.tasks[t].correct for t in shared],
                                                  [other.tasks[t].correct for t in shared])
        mean_b = sum(base.tasks[t].acc.rate for t in shared) / len(shared)
        deltas.append(PairedDelta(metric=ACCURACY_ALL, kind="rate", n=sum(base.tasks[t].n for t in shared),
                                  base=mean_b, other=mean_b + delta, delta=delta, p_value=p, ci95=ci))
    return deltas


def compare_results(base: EvalResult, other: EvalResult) -> list[PairedDelta]:
    """Every metric the two runs share, tested pairwise: harmful rate (ASR) and refusal rate per harmful set and mode,
    XSTest refusal, NLL per set, zero-shot accuracy per task and over tasks."""
    deltas: list[PairedDelta] = []
    ids = (base.safety.harm_judge_id, other.safety.harm_judge_id)
    if None not in ids and ids[0] != ids[1]:
        raise PairingError(f"the harmful rates were judged by different harm judges ({ids[0]} vs {ids[1]}): their "
                           "difference would be the judges', not the models'",
                           hint="rejudge both runs with one judge: `safeunits rejudge RUN_DIR`")
    for set_name, modes in base.safety.sets.items():
        for mode, b in modes.items():
            o = other.safety.sets.get(set_name, {}).get(mode)
            if o is None:
                continue
            _same_items(f"{set_name}/{mode}", b.dataset, o.dataset, b.n, o.n)
            p, disc = mcnemar_exact(b.harmful, o.harmful)
            deltas.append(PairedDelta(metric=f"asr {set_name}/{mode}", kind="rate", n=b.n, base=b.rate, other=o.rate,
                                      delta=o.rate - b.rate, p_value=p, discordant=disc))
            p, disc = mcnemar_exact([v == "refused" for v in b.verdicts], [v == "refused" for v in o.verdicts])
            deltas.append(PairedDelta(metric=f"refusal {set_name}/{mode}", kind="rate", n=b.n, base=b.refusal.rate,
                                      other=o.refusal.rate, delta=o.refusal.rate - b.refusal.rate, p_value=p,
                                      discordant=disc))
    if base.over_safety and other.over_safety:
        b, o = base.over_safety, other.over_safety
        _same_items(b.name, b.dataset, o.dataset, b.n, o.n)
        p, disc = mcnemar_exact([lab != "1_full_compliance" for lab in b.labels],
                                [lab != "1_full_compliance" for lab in o.labels])
        deltas.append(PairedDelta(metric="xstest_refusal", kind="rate", n=b.n, base=b.refusal.rate,
                                  other=o.refusal.rate, delta=o.refusal.rate - b.refusal.rate, p_value=p,
                                  discordant=disc))
    shared = [name for name in base.utility.sets if name in other.utility.sets]
    for name in shared:
        b, o = base.utility.sets[name], other.utility.sets[name]
        _same_items(name, b.dataset, o.dataset, b.n, o.n)
    groups = [[name] for name in shared] + ([shared] if len(shared) > 1 else [])
    for names in groups:
        b_sets = [base.utility.sets[n] for n in names]
        o_sets = [other.utility.sets[n] for n in names]
        delta, ci, p = paired_bootstrap_nll(b_sets, o_sets)
        deltas.append(PairedDelta(metric=UTILITY_ALL if len(names) > 1 else f"nll {names[0]}", kind="nll",
                                  n=sum(s.n for s in b_sets), base=_pooled_nll(b_sets), other=_pooled_nll(o_sets),
                                  delta=delta, p_value=p, ci95=ci))
    if base.utility.accuracy and other.utility.accuracy:
        deltas += accuracy_deltas(base.utility.accuracy, other.utility.accuracy)
    return deltas


def _pooled_nll(sets: list[UtilitySetMetrics]) -> float:
    return sum(s.nll * s.tokens for s in sets) / sum(s.tokens for s in sets)


def _same_items(what: str, dataset_a: str, dataset_b: str, n_a: int, n_b: int) -> None:
    if dataset_a != dataset_b or n_a != n_b:
        raise PairingError(f"{what}: the runs judged different items ({dataset_a} n={n_a} vs {dataset_b} n={n_b}); "
                           "compare runs of the same suite")


def headline_marks(base: EvalResult, other: EvalResult) -> dict[str, bool]:
    """Headline key -> is the difference from `base` significant (keys without a paired test are absent)."""
    deltas = compare_results(base, other)
    by_metric = {d.metric: d.significant for d in deltas}
    main = next(iter(base.safety.sets), None)
    nll = [d.significant for d in deltas if d.kind == "nll"]
    utility = by_metric.get(UTILITY_ALL, nll[0] if len(nll) == 1 else None)
    acc = [d.significant for d in deltas if d.metric.startswith("acc ")]
    marks = {"asr": by_metric.get(f"asr {main}/none"), "asr_system": by_metric.get(f"asr {main}/safety"),
             "refusal": by_metric.get(f"refusal {main}/none"), "refusal_system": by_metric.get(f"refusal {main}/safety"),
             "xstest_refusal": by_metric.get("xstest_refusal"), "utility_nll": utility, "perplexity": utility,
             "accuracy": by_metric.get(ACCURACY_ALL, acc[0] if len(acc) == 1 else None)}
    return {k: v for k, v in marks.items() if v is not None}
