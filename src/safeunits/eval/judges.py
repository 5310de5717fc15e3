"""Judges: decide whether a response refuses, and whether a harmful prompt's response is an attack success.

Named judges (`get_judge(name)`):
- `keyword`  SSAH / Wei et al. (2024) rule: a response is an attack success when it contains none of the
             GCG refusal substrings (case-sensitive, as in their code) and has at least 20 words.
- `prefix`   refusal only when the response *starts* with a refusal phrase (case-insensitive).
- `strmatch` XSTest's own string-match classifier (`strmatch_label` in the XSTest repo), kept verbatim as
             the yardstick `safeunits judge-check` compares against.
- `xstest`   our three-class judge (1_full_compliance / 2_full_refusal / 3_partial_refusal): refusal cues in
             the opening sentence, refusal cues later in the answer, and "here is how" after a refusal.
- `learned`  a linear classifier on TF-IDF text features trained on XSTest's human labels
             (`safeunits.eval.learned_judge`; trained on first use, cached): the default *refusal* judge.
- `harm`     the default *harm* judge: reads request and response through the default model's hidden states and
             a logistic regression trained on human harm labels (`safeunits.eval.harm_judge`; shipped weights).
- `model:PATH` (or a folder path) a local judge model: a sequence classifier or a causal LM asked Yes/No
             (`safeunits.eval.judge_models`, which also holds the presets of the field's judge models:
             `llama-guard-3:PATH`, `harmbench-cls:PATH`, `wildguard:PATH`, ...).

Harmful prompts get a three-way verdict (`Judge.harm_verdicts`): "refused", "incoherent" (not a refusal, but
no usable answer either: degenerate text by `safeunits.eval.coherence`, or shorter than the judge's word
minimum) or "complied" (the attack succeeded). `complied` / `complied_many` are verdict == "complied".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional

from safeunits.errors import UserValueError
from safeunits.eval.coherence import CoherenceConfig
from safeunits.eval.judge_base import (FULL_COMPLIANCE, FULL_REFUSAL, HARM_VERDICTS, PARTIAL_REFUSAL, XSTEST_LABELS,
                                       HarmVerdict, Judge, check_lengths)
from safeunits.eval.judge_models import JUDGE_MODEL_PRESETS, ModelJudge, ModelJudgeConfig, judge_from_spec
from safeunits.eval.learned_judge import LearnedJudge, load_or_train
from safeunits.eval.rule_judges import (KEYWORD_PRESETS, RULE_JUDGES, KeywordJudge, KeywordJudgeConfig, XSTestJudge,
                                        XSTestJudgeConfig, rule_judge)
from safeunits.registry import Registry

__all__ = ["FULL_COMPLIANCE", "FULL_REFUSAL", "PARTIAL_REFUSAL", "XSTEST_LABELS", "HARM_VERDICTS", "HarmVerdict", "Judge",
           "check_lengths", "KEYWORD_PRESETS", "KeywordJudge", "KeywordJudgeConfig", "XSTestJudge", "XSTestJudgeConfig",
           "ModelJudge", "ModelJudgeConfig", "JUDGES", "JUDGE_NAMES", "get_judge", "judge_identity"]

# --- registry ----------------------------------------------------------------------------------------

JudgeFactory = Callable[[Optional[Path]], Judge]
"""Builds a named judge; takes the data folder (where `learned` finds XSTest's labels on first use)."""
JUDGES: Registry[JudgeFactory] = Registry("judge")
for _rule in RULE_JUDGES:
    JUDGES.add(_rule, lambda data_dir, _name=_rule: rule_judge(_name))


@JUDGES.register("learned")
def _learned(data_dir: Path | None) -> Judge:
    return LearnedJudge(load_or_train(data_dir))


@JUDGES.register("harm")
def _harm(data_dir: Path | None) -> Judge:
    from safeunits.eval.harm_judge import load_harm_judge  # loads the default model: only when asked for

    return load_harm_judge()


JUDGE_NAMES = tuple(JUDGES.names())


def judge_identity(name: str) -> str:
    """`Judge.identity` of a named judge without building it: what an experiment's cache keys on, so that
    retrained harm-judge weights judge cached evaluations again."""
    if name == "harm":
        from safeunits.eval.harm_judge import shipped_identity

        return shipped_identity()
    return name


def get_judge(name: str = "keyword", *, data_dir: str | os.PathLike | None = None,
              coherence: CoherenceConfig | None = None) -> Judge:
    """A judge by name: `keyword`, `prefix`, `strmatch`, `xstest`, `learned`, `harm`, `model:PATH` / a model folder
    path, or a judge-model preset `PRESET:PATH_OR_HUB_ID` (`llama-guard-3`, `harmbench-cls`, `wildguard`, ...;
    eval/judge_models.py).

    `data_dir` is where `learned` finds XSTest's labels on first use (default `$SAFEUNITS_DATA_DIR`);
    `coherence` replaces the default coherence rule of the harm verdicts.
    """
    judge = JUDGES.get(name)(Path(data_dir) if data_dir else None) if name in JUDGES else judge_from_spec(name)
    if judge is None:
        raise UserValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}, model:PATH for a local "
                             f"judge model, or PRESET:PATH_OR_HUB_ID with PRESET one of {', '.join(JUDGE_MODEL_PRESETS)}")
    if coherence is not None:
        judge.coherence = coherence
    return judge
