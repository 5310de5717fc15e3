"""Plan and run an experiment with a hash-based cache of finished steps.

A step's key is a hash of its settings, the keys of the steps it consumes, the experiment's load settings (dtype,
device), the resolved suite and the harm judge's identity (its weights' digest) for steps that evaluate, and the
safeunits version. So a re-run skips every finished step, changing one setting re-runs that step and exactly the
steps downstream of it, and nothing else. An evaluation whose judge alone changed keeps its folder: its saved
answers are judged again, nothing is generated again.
Each step writes into `out/<step-name>/`; `done.json` (with the key and the outputs) is written last, so a
folder without it is unfinished: a re-run with the same key resumes inside it (evaluations reuse finished
generations), one with another key starts the folder afresh. A failing step leaves earlier steps intact.
`out` follows the output-folder rule (safeunits.outdir), and a step folder the runner did not make (no
started.json) is never removed: the run is refused before any step runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import safeunits
from safeunits.errors import UserError
from safeunits.eval.context import EvalContext
from safeunits.experiments.config import Experiment, StepBase, SweepStep
from safeunits.experiments.outputs import StepOutputs
from safeunits.io import read_json, write_json, write_text
from safeunits.outdir import FORCE_HINT, OutputFolderError, check_output_dir, claim_output_dir

log = logging.getLogger(__name__)

DONE = "done.json"
STARTED = "started.json"


class StepFailedError(UserError):
    """A step failed for a reason the user can fix; the message names the step, the finished steps are kept."""


@dataclass
class PlannedStep:
    """One step of the plan: its cache key and whether a finished result with that key is on disk."""

    step: StepBase
    key: str
    cached: bool
    inputs: dict[str, str]  # field -> step name
    seconds: float | None = None  # wall time of the run that produced the result (cached or this run)
    previous_key: str | None = None  # the key of a finished result on disk, if any
    resumes: bool = False  # an unfinished folder of the same key is on disk: the step continues inside it
    answers_key: str = ""  # the key without the judges: equal in a folder whose answers can be judged again
    rejudges: bool = False  # only the judges changed: the evaluation's saved answers are judged again


@dataclass
class RunResult:
    plan: list[PlannedStep]
    ran: list[str] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)


def _hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digests(experiment: Experiment, step: StepBase) -> dict[str, str]:
    """Fingerprints of what a step names outside the experiment (a unit map file, a patch or D_h folder): replacing
    it re-runs the step. A file by its content; a folder by its files' names, sizes and modification times (a
    dense patch is as large as the model). Models are keyed by name, as before."""
    internal = experiment.inputs(step)
    out = {}
    for name, ref in sorted(step.references().items()):
        path = Path(ref)
        if name in internal or name == "model" or not path.exists():
            continue
        if path.is_file():
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file())
            out[name] = _hash([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    return out


def step_keys(experiment: Experiment, evaluation: EvalContext) -> dict[str, str]:
    """The cache key of every step, in order (a step's key includes the keys of the steps it consumes)."""
    return _step_keys(experiment, evaluation)[0]


def _step_keys(experiment: Experiment, evaluation: EvalContext) -> tuple[dict[str, str], dict[str, str]]:
    """Every step's key, and its key without the judges' identities (what its answers depend on; the key of
    steps that do not evaluate, and the whole key before identities were keyed)."""
    from safeunits.eval.judges import judge_identity

    suite = evaluation.suite.model_dump(mode="json") if evaluation.suite is not None else None
    judges = {"harm": judge_identity(evaluation.suite.harm_judge)} if evaluation.suite is not None else None
    keys: dict[str, str] = {}
    answers: dict[str, str] = {}
    for step in experiment.steps:
        answers[step.name] = _hash({
            "kind": step.kind,
            "settings": step.cache_settings(),
            "inputs": {f: keys[ref] for f, ref in sorted(experiment.inputs(step).items())},
            "load": {"dtype": experiment.dtype, "device": experiment.device},
            "suite": suite if step.uses_suite else None,
            "safeunits": safeunits.__version__,
            **({"files": files} if (files := _file_digests(experiment, step)) else {}),  # older keys stay valid
        })
        judged = step.uses_suite and judges is not None
        keys[step.name] = _hash({"answers": answers[step.name], "judges": judges}) if judged else answers[step.name]
    return keys, answers


def _done(folder: Path) -> dict[str, Any] | None:
    """A finished step's record; None when there is none, or when its outputs are not of this version's form (a
    step finished by safeunits 0.1, whose tables were Markdown text, runs again rather than report half)."""
    path = folder / DONE
    if not path.is_file():
        return None
    done = read_json(path)
    try:
        done["outputs"] = StepOutputs.model_validate(done.get("outputs", {}))
    except ValidationError:
        log.info("%s: finished by an older safeunits (outputs of another form); the step runs again", folder)
        return None
    return done


def make_plan(experiment: Experiment, out_dir: str | Path, evaluation: EvalContext) -> list[PlannedStep]:
    """What would run and what is cached in `out_dir`."""
    out = Path(out_dir)
    keys, answers = _step_keys(experiment, evaluation)
    plan = []
    for step in experiment.steps:
        key = keys[step.name]
        done = _done(out / step.name)
        cached = done is not None and done.get("key") == key
        started = read_json(out / step.name / STARTED) if (out / step.name / STARTED).is_file() else {}
        resumes = not cached and started.get("key") == key
        rejudges = (not cached and not resumes and step.judged_from_answers
                    and _answers_key(started) == answers[step.name])
        plan.append(PlannedStep(step, key, cached, experiment.inputs(step), done.get("seconds") if cached else None,
                                done.get("key") if done else None, resumes, answers[step.name], rejudges))
    return plan


def _answers_key(started: dict[str, Any]) -> str | None:
    """A folder's key without the judges (before identities were keyed, its key was just that)."""
    return started.get("answers_key", started.get("key"))


def check_run_folder(plan: list[PlannedStep], out_dir: str | Path, *, force: bool = False) -> None:
    """Refuse a run folder that is not an experiment's (see safeunits.outdir), or a step folder there that this
    runner did not make (it would have to be removed or mixed with): before any step runs, dry runs included."""
    out = check_output_dir(out_dir, "experiment", force=force)
    for p in plan:
        folder = out / p.step.name
        if force or p.cached or not folder.exists() or _ours(folder):
            continue
        raise OutputFolderError(f"{folder} exists and was not made by this experiment (step {p.step.name!r} writes "
                                "there); refusing to remove or mix with it", hint="move it away, or " + FORCE_HINT)


def _ours(folder: Path) -> bool:
    return folder.is_dir() and ((folder / STARTED).is_file() or (folder / DONE).is_file() or not any(folder.iterdir()))


def format_plan(plan: list[PlannedStep], out_dir: str | Path) -> str:
    """One line per step: cached, or why it runs (new, its settings changed, or a step it consumes re-runs)."""
    width = max(len(p.step.name) for p in plan)
    lines = [f"plan for {out_dir}:"]
    reruns: set[str] = set()
    for p in plan:
        if p.cached:
            what = "cached"
        else:
            stale = [ref for ref in dict.fromkeys(p.inputs.values()) if ref in reruns]
            what = ("run: judged again from its saved answers (the judge changed)" if p.rejudges
                    else "run: after " + ", ".join(stale) if stale
                    else "run: resumes its unfinished folder" if p.resumes
                    else "run: not run yet" if p.previous_key is None else "run: settings changed")
            reruns.add(p.step.name)
        uses = ", ".join(f"{f}={ref}" for f, ref in p.inputs.items())
        lines.append(f"  {p.step.name:<{width}}  {p.step.kind:<12}  {what}" + (f"  [uses {uses}]" if uses else ""))
    n_run = sum(not p.cached for p in plan)
    lines.append(f"{n_run} step(s) to run, {len(plan) - n_run} cached")
    return "\n".join(lines)


def check_models(experiment: Experiment) -> None:
    """Every model a step names directly (not through an earlier step) exists: a typo fails before any step runs."""
    from safeunits.models.loading import check_model_reference

    for step in experiment.steps:
        model = getattr(step, "model", None)
        if model is not None and "model" not in experiment.inputs(step):
            try:
                check_model_reference(model)
            except UserError as err:
                raise UserError(f"step {step.name!r}: {err}", hint=err.hint) from err


def evaluation_context(experiment: Experiment, *, progress: bool = True) -> EvalContext:
    """The experiment's suite and data folder, resolved once (a typo fails here, before any step runs); the
    XSTest prompts a sweep step selects on, and those of `held_out_xstest` (a sweep's choice given as a file), are
    left out of every evaluation of the run (test != validation): the one place that applies that rule."""
    evaluation = EvalContext.create(experiment.suite, data_dir=experiment.data_dir, progress=progress,
                                    limit=experiment.limit)
    held_out = [step.settings.validation.xstest_prompts for step in experiment.steps if isinstance(step, SweepStep)]
    return evaluation.excluding_over_safety([*held_out, *experiment.held_out_xstest])


def run_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True,
                   report: bool = True, force: bool = False) -> RunResult:
    """Run every step that is not cached, in order, then write the report (report.md, report.html).

    `out_dir` must be new, empty or an experiment's run folder (`force`: any folder; nothing of it is removed)."""
    from safeunits.experiments.steps import STEP_FUNCTIONS, StepContext

    check_models(experiment)
    evaluation = evaluation_context(experiment, progress=progress)
    plan = make_plan(experiment, out_dir, evaluation)
    check_run_folder(plan, out_dir, force=force)
    out = claim_output_dir(out_dir, "experiment", force=force)
    write_text(out / "experiment.yaml", yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False))
    outputs: dict[str, StepOutputs] = {}
    result = RunResult(plan)
    for p in plan:
        folder = out / p.step.name
        if p.cached:
            log.info("step %s (%s): cached", p.step.name, p.step.kind)
            outputs[p.step.name] = _done(folder)["outputs"]
            continue
        _prepare(folder, p)
        log.info("step %s (%s): running", p.step.name, p.step.kind)
        ctx = StepContext(experiment, folder, evaluation, outputs, out)
        started = time.time()
        try:
            step_outputs = STEP_FUNCTIONS.get(p.step.kind)(p.step, ctx)
        except UserError as err:
            raise StepFailedError(f"step {p.step.name!r} ({p.step.kind}) failed: {err}",
                                  hint=(err.hint + "; " if err.hint else "") +
                                  "finished steps are kept: fix it and run again") from err
        except Exception as err:
            log.error("step %s (%s) failed; the steps before it are finished and kept", p.step.name, p.step.kind)
            err.add_note(f"safeunits: in step {p.step.name!r} ({p.step.kind}) of experiment {experiment.name!r}")
            raise
        p.seconds = round(time.time() - started, 1)
        write_json(folder / DONE, {"key": p.key, "name": p.step.name, "kind": p.step.kind, "seconds": p.seconds,
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "outputs": step_outputs.model_dump(mode="json", exclude_defaults=True),
                                   "settings": p.step.model_dump(mode="json")})
        outputs[p.step.name] = step_outputs
        result.ran.append(p.step.name)
    if report:
        from safeunits.experiments.report import write_report

        result.report = write_report(experiment, out, plan, outputs, evaluation, ran=result.ran)
    return result


def _prepare(folder: Path, p: PlannedStep) -> None:
    """An unfinished folder with the same key is resumed, and an evaluation whose judges alone changed keeps its
    answers (the evaluation resumes: it judges them again); any other folder of this runner with another key is
    stale and removed (one it did not make is kept: check_run_folder refused it unless --force)."""
    started = folder / STARTED
    if _ours(folder) and not (p.resumes or p.rejudges):
        shutil.rmtree(folder)
    if (folder / DONE).exists():
        (folder / DONE).unlink()
    write_json(started, {"key": p.key, "answers_key": p.answers_key, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
