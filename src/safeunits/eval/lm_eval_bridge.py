"""Optional bridge to lm-evaluation-harness (SSAH's zero-shot tasks), used only when `lm_eval` imports."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.eval.suites import LMEvalConfig


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def run_lm_eval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: LMEvalConfig,
                *, batch_size: int = 8) -> dict[str, Any]:
    """Accuracy per task via lm_eval.simple_evaluate on the in-memory model; `{"skipped": why}` without lm_eval."""
    if not lm_eval_available():
        return {"skipped": "lm_eval is not installed (pip install lm-eval); tasks not run", "tasks": config.tasks}
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=config.tasks, num_fewshot=config.num_fewshot, limit=config.limit)
    except Exception as err:  # missing task data offline is the common case: report, do not lose the run
        return {"skipped": f"lm_eval failed: {type(err).__name__}: {err}", "tasks": config.tasks}
    results = out.get("results", {}) if out else {}
    return {"tasks": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))} for t, r in results.items()}}
