"""`rejudge`: a finished run's metrics recomputed from its saved answers with other judges, in seconds, no model.

Why: judging improves (refusal judges gave way to a harm judge) while generating costs minutes to hours. The answers
in `generations/` are what the model said; only the verdicts change. Utility (NLL), MT-Bench answers and lm-eval
results do not depend on a judge and are carried over from the run's previous `metrics.json` (or its `nll/` cache).
The run's `config.json` is updated to the new judges, so a later `safeunits eval` into the folder resumes it; the
previous `metrics.json` is kept as `metrics.prev.json`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safeunits.distributed import ProcessShard
from safeunits.errors import UserFileNotFoundError, UserValueError
from safeunits.eval.generation import GenerationJob, read_generations
from safeunits.eval.nll import NLLStats
from safeunits.eval.report import summary_document
from safeunits.eval.result import EvalResult, ModelIdentity, Timing, UtilityMetrics
from safeunits.eval.runner import _Run
from safeunits.eval.suites import SuiteConfig
from safeunits.io import read_json, write_json, write_text


class IncompleteRunError(UserValueError):
    """The run folder lacks answers a judge would need (an evaluation that did not finish)."""


class _SavedAnswers(_Run):
    """An evaluation whose answers come from the run folder instead of a model."""

    def __init__(self, config: SuiteConfig, out: Path, data_dir, progress: bool, previous: dict | None) -> None:
        super().__init__(None, None, config, out, data_dir, progress, "transformers", ProcessShard())
        self.previous = previous

    def _generate(self, jobs: list[tuple[str, GenerationJob]]) -> list[list[str]]:
        return [self._saved(rel, job.prompts) for rel, job in jobs]

    def _saved(self, rel_path: str, prompts: list[str]) -> list[str]:
        path = self.out / rel_path
        if not path.is_file():
            raise IncompleteRunError(f"{path} is missing", hint="finish the run with `safeunits eval` into the same "
                                     "folder (it resumes), then rejudge")
        rows = read_generations(path)
        if [r.get("prompt") for r in rows] != prompts or [r["index"] for r in rows] != list(range(len(prompts))):
            raise IncompleteRunError(f"{path} holds {len(rows)} answers that are not the suite's {len(prompts)} prompts "
                                     "in order", hint="finish the run with `safeunits eval` into the same folder")
        self.resumed += len(rows)
        return [str(r["response"]) for r in rows]

    def utility(self) -> UtilityMetrics:
        if self.previous is not None and "utility" in self.previous:
            return UtilityMetrics.model_validate(self.previous["utility"])
        return super().utility()

    def _nll_stats(self, name: str, records) -> NLLStats:
        path = self.out / "nll" / f"{name}.json"
        if not path.is_file():
            raise IncompleteRunError(f"{path} is missing (utility scores need the model)",
                                     hint="evaluate into the folder again with `safeunits eval` (answers are reused)")
        return NLLStats(**read_json(path))


def rejudge(run_dir: str | os.PathLike, *, harm_judge: str | None = None, refusal_judge: str | None = None,
            xstest_judge: str | None = None, data_dir: str | os.PathLike | None = None,
            progress: bool = True) -> EvalResult:
    """Recompute `run_dir`'s metrics from its saved answers; judges not given stay the run's own."""
    out = Path(run_dir)
    config_path = out / "config.json"
    if not config_path.is_file():
        raise UserFileNotFoundError(f"{config_path} does not exist", hint="give the folder of a `safeunits eval` run")
    saved = read_json(config_path)
    suite = SuiteConfig.model_validate(saved["suite"]).model_dump()
    for key, judge in (("harm_judge", harm_judge), ("refusal_judge", refusal_judge)):
        suite[key] = judge or suite[key]
    if xstest_judge and suite.get("over_safety"):
        suite["over_safety"]["judge"] = xstest_judge
    suite = SuiteConfig.model_validate(suite)
    data_dir = data_dir if data_dir is not None else saved.get("data_dir")
    metrics_path = out / "metrics.json"
    previous = read_json(metrics_path) if metrics_path.is_file() else None
    run = _SavedAnswers(suite, out, data_dir, progress, previous)
    run.generate()
    result = EvalResult(suite=suite.name, model=ModelIdentity.model_validate(saved["model"]), safety=run.safety(),
                        over_safety=run.over_safety(), utility=run.utility(), answers=run.answers(), out_dir=out)
    if previous is not None:
        result.lm_eval = previous.get("lm_eval")
        result.timing = Timing.model_validate(previous["timing"]) if previous.get("timing") else None
        result.environment = {**previous.get("environment", {}), "rejudged": True}
        shutil.copyfile(metrics_path, out / "metrics.prev.json")
    result.with_headline()
    write_json(config_path, {**saved, "suite": suite.model_dump(mode="json")})
    result.save(out)
    write_text(out / "summary.md", summary_document(result).markdown())
    return result
