"""`EvalContext`: the one way into evaluation for every experiment.

An entry point (a CLI command, the demo, a Python script) resolves the suite and the data folder once, here, and
hands the context down; experiments (training tables, pruning, SafePatching sweep/baselines/continual) call
`ctx.evaluate(model, tokenizer, out_dir, name=...)` and never see a suite name or a data path again. A typo in a
suite fails at the entry point, before hours of training, and the data folder cannot be dropped on the way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.errors import UserValueError
from safeunits.eval.generation import Backend
from safeunits.eval.result import EvalResult
from safeunits.eval.runner import evaluate
from safeunits.eval.suites import SuiteConfig, optional_suite
from safeunits.eval.vllm_backend import check_backend
from safeunits.paths import data_dir as resolve_data_dir
from safeunits.runtime import RunContext, set_threads


class NoEvaluationError(UserValueError):
    """An experiment asked to evaluate through a context built with no suite ('none')."""


@dataclass(frozen=True)
class EvalContext:
    """A resolved suite (None: no evaluation), the data folder datasets load from, whether to show progress, and
    the generation backend ("transformers", or "vllm" on GPU machines: same files, see eval/vllm_backend.py)."""

    suite: SuiteConfig | None
    data_dir: Path | None = None
    progress: bool = True
    backend: Backend = "transformers"

    @classmethod
    def create(cls, suite: str | os.PathLike | SuiteConfig | None = "quick", *,
               data_dir: str | os.PathLike | None = None, progress: bool = True,
               limit: int | None = None, backend: str = "transformers", threads: int | None = None) -> EvalContext:
        """Resolve a suite (name, YAML path, config; None/'none' = no evaluation), the data folder and the backend now.

        `threads` sets torch's CPU threads for the process (safeunits.runtime.set_threads; the CLI's --threads)."""
        if threads is not None:
            set_threads(threads)
        config = optional_suite(suite)
        if config is not None and limit is not None:
            config = config.with_limit(limit)
        return cls(config, resolve_data_dir(data_dir), progress, check_backend(backend))

    @property
    def run(self) -> RunContext:
        """The data folder and progress setting alone (what training needs; it never sees the suite)."""
        return RunContext(self.data_dir, self.progress)

    @property
    def enabled(self) -> bool:
        return self.suite is not None

    def excluding_over_safety(self, prompt_sets: list[str]) -> EvalContext:
        """The same context with `prompt_sets` left out of the over-safety set: a selection's held-out prompts
        must not be scored again as test prompts (every row of a table gets the same cut, so pairing holds)."""
        over = self.suite.over_safety if self.suite is not None else None
        new = [s for s in prompt_sets if over is not None and s not in over.exclude]
        if not new:
            return self
        return self.with_suite(self.suite.model_copy(
            update={"over_safety": over.model_copy(update={"exclude": [*over.exclude, *new]})}))

    def with_suite(self, suite: SuiteConfig) -> EvalContext:
        """The same data folder and progress setting, another suite (e.g. a sweep's held-out one)."""
        return replace(self, suite=suite)

    def evaluate(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 out_dir: str | os.PathLike | None, *, name: str | None = None) -> EvalResult:
        """The three axes of `model` into `out_dir` (None: nothing written); a rerun resumes finished generations."""
        if self.suite is None:
            raise NoEvaluationError("this run was configured with no evaluation suite ('none')")
        return evaluate(model, tokenizer, self.suite, out_dir=out_dir, data_dir=self.data_dir,
                        progress=self.progress, model_name=name, backend=self.backend)
