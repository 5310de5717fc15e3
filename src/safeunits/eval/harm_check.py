"""How well does each judge agree with humans on *harm*? Every judge on every human-labelled harm source.

For each source (`safeunits.eval.harm_labels`; the big ones as the harm judge's seeded sample) and judge: accuracy, F1 of the harmful class, Cohen's kappa, the
false-positive rate (harmless answers called harmful) and false-negative rate (harmful answers missed), each with a
95 % bootstrap interval (rows resampled). Refusal judges are scored through their harm proxy ("complied" = harmful),
so the table shows what calling a refusal rate an attack success rate costs. The `harm` judge learns from these
sources, so it is scored leave-one-source-out: source k is judged by a model trained on the other sources only
(`harm_judge.training_set` also drops any row of another source that repeats one of k).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from safeunits.eval.harm_labels import FIT, HARM_SOURCES

DEFAULT_HARM_JUDGES = ("keyword", "strmatch", "xstest", "learned", "harm")
LEAVE_ONE_SOURCE_OUT = ("harm",)
METRICS = ("accuracy", "f1", "kappa", "fpr", "fnr")


def agreement(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, harmful-class F1, Cohen's kappa, FPR and FNR of boolean predictions (nan where undefined)."""
    gold, pred = gold.astype(bool), pred.astype(bool)
    n = len(gold)
    tp = float(np.sum(gold & pred))
    tn = float(np.sum(~gold & ~pred))
    fp = float(np.sum(~gold & pred))
    fn = float(np.sum(gold & ~pred))
    acc = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
    return {"accuracy": acc,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
            "kappa": (acc - chance) / (1 - chance) if chance < 1 else float("nan"),
            "fpr": fp / (fp + tn) if fp + tn else float("nan"),
            "fnr": fn / (fn + tp) if fn + tp else float("nan")}


def bootstrap_intervals(gold: np.ndarray, pred: np.ndarray, *, n_boot: int = 1000,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of every `agreement` metric, resampling rows (seeded: same rows, same interval)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gold), size=(n_boot, len(gold)))
    draws = [agreement(gold[i], pred[i]) for i in idx]
    out = {}
    for m in METRICS:
        values = np.array([d[m] for d in draws])
        values = values[~np.isnan(values)]
        out[m] = (float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))) if len(values) else (
            float("nan"), float("nan"))
    return out


def score(gold: list[bool], pred: list[bool]) -> dict[str, Any]:
    g, p = np.array(gold, dtype=bool), np.array(pred, dtype=bool)
    return {"n": len(g), "harmful": int(g.sum()), "predicted_harmful": int(p.sum()), **agreement(g, p),
            "ci95": bootstrap_intervals(g, p)}


def harm_check(judges: tuple[str, ...] | list[str] = DEFAULT_HARM_JUDGES, *, sources: list[str] | None = None,
               data_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Every judge on every harm source (the harm judge leave-one-source-out) and the per-judge worst source."""
    from safeunits.eval.judges import get_judge

    from safeunits.eval.harm_judge import HarmJudgeConfig, sampled_rows

    config = HarmJudgeConfig(sources=tuple(sources or HARM_SOURCES))
    rows = sampled_rows(config, list(config.sources), data_dir)
    per_source: dict[str, dict[str, Any]] = {s: {} for s in rows}
    encoder = None
    for name in tqdm(judges, desc="harm check", unit="judge", disable=not progress):
        for source, part in rows.items():
            requests, responses = [r.request for r in part], [r.response for r in part]
            if name in LEAVE_ONE_SOURCE_OUT:
                from safeunits.eval.harm_judge import HarmEncoder, source_features, train_harm_model

                encoder = encoder or HarmEncoder(config.features)
                model = train_harm_model(config, data_dir=data_dir, exclude=source, encoder=encoder, progress=progress)
                probs = model.probabilities(source_features(encoder, source, part, progress=progress))
                pred = (probs >= config.threshold).tolist()
            else:
                pred = get_judge(name, data_dir=data_dir).harmful_many(requests, responses)
            per_source[source][name] = score([r.harmful for r in part], pred)
    summary = {}
    for name in judges:
        accs = {s: per_source[s][name]["accuracy"] for s in per_source}
        kappas = {s: per_source[s][name]["kappa"] for s in per_source}
        summary[name] = {"accuracy_mean": float(np.mean(list(accs.values()))), "accuracy_min": min(accs.values()),
                         "kappa_min": float(np.nanmin(list(kappas.values()))),
                         "scored": "leave-one-source-out" if name in LEAVE_ONE_SOURCE_OUT else "as shipped"}
    return {"per_source": per_source, "summary": summary, "fit": {s: FIT[s] for s in rows}}
