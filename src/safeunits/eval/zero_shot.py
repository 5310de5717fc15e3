"""Utility as task accuracy: lm-evaluation-harness's zero-shot multiple-choice tasks on the in-memory model.

Each task is lm-eval's own config (prompt, choices, target, metrics `acc` / `acc_norm`), loaded from the installed
package; only the data source changes when `<data dir>/zero_shot/` holds the split: the documents come from
safeunits.data.zero_shot (local files mapped onto the Hub dataset's fields) through lm-eval's `custom_dataset`
hook, so no request reaches the Hub. Without local files the stock task reads the Hub as lm-eval always does.
lm-eval builds the requests, the model scores them (`ScoringLM`: every context prefilled once for all its
choices) and lm-eval turns the log-likelihoods into `acc` / `acc_norm`; the per-item outcomes are kept
(`zero_shot/<task>.jsonl` in the run folder) so two runs can be compared pairwise and a run resumes.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.data.zero_shot import TASKS, load_zero_shot_docs, local_files, zero_shot_task
from safeunits.errors import UserValueError
from safeunits.eval.result import AccuracyMetrics, TaskAccuracy
from safeunits.eval.suites import LMEvalConfig
from safeunits.io import write_text

SAMPLE_SEED = 0
# lm-eval's own config of each task, relative to the installed lm_eval/tasks/ (read directly: indexing every
# task of the package takes a minute on a busy CPU)
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml",
    "mmlu": "mmlu/default/mmlu_abstract_algebra.yaml",  # its template; the 57 subjects are run as one task
}
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"


@dataclass
class ItemScore:
    """One document: its index in the split, the gold choice, each choice's log-likelihood, and lm-eval's verdicts."""

    doc_id: int
    target: int
    lls: list[float]
    acc: bool
    acc_norm: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "target": self.target, "lls": self.lls, "acc": self.acc,
                "acc_norm": self.acc_norm}


@dataclass
class TaskScores:
    """A task's scored documents (in doc_id order), where its data came from, and the size of its whole split."""

    task: str
    source: str
    split_size: int
    items: list[ItemScore]


def sample_ids(split_size: int, limit: int | None, seed: int = SAMPLE_SEED) -> list[int] | None:
    """The fixed sample of a split (the same documents in every run and on every machine), sorted; None: all."""
    if limit is None or limit >= split_size:
        return None
    return sorted(random.Random(seed).sample(range(split_size), limit))


def _stock_config(task: str) -> dict[str, Any]:
    """lm-eval's own YAML config of a task (functions resolved, includes merged)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / STOCK_YAML[zero_shot_task(task).name]
    if not path.is_file():
        raise UserValueError(f"lm-eval {lm_eval_version()} has no {path}: this version of safeunits reads lm-eval's "
                             "task configs from the lm_eval 0.4 layout", hint="pip install 'lm_eval>=0.4.13,<0.5'")
    cfg = load_yaml(path, resolve_func=True)
    for key in ("tag", "group", "task_alias", "dataset_name" if task == "mmlu" else ""):
        cfg.pop(key, None)
    if task == "mmlu":  # the 57 subject tasks as one (a size-weighted mean, as lm-eval's group reports)
        cfg.update(task="mmlu", dataset_name="all", description=MMLU_DESCRIPTION)
    return cfg


def task_config(task: str, data_dir: str | os.PathLike | None, ids: list[int] | None = None) -> tuple[dict[str, Any], str]:
    """The lm-eval config dict of `task`, with its data from the local files when they exist, and its source.

    Locally only the documents `ids` (all when None) are handed to lm-eval, which then processes no more than
    it scores; the Hub route takes lm-eval's own `samples` selection instead (run_zero_shot)."""
    cfg = _stock_config(task)
    paths = local_files(task, data_dir)
    if paths is None:
        return cfg, f"hub:{cfg['dataset_path']}"
    docs = load_zero_shot_docs(task, data_dir)
    if ids is not None:
        docs = [docs[i] for i in ids]
    eval_key = "test_split" if cfg.get("test_split") else "validation_split"  # the split lm-eval scores
    split = cfg[eval_key]

    def custom_dataset(**_: Any):
        import datasets

        return {split: datasets.Dataset.from_list(docs)}

    cfg.update(custom_dataset=custom_dataset, dataset_path="json", dataset_name=None, dataset_kwargs=None,
               training_split=None, fewshot_split=None, validation_split=None, test_split=None)
    cfg[eval_key] = split
    return cfg, f"local:{paths[0]}"


def run_zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, TaskScores], dict[str, str]]:
    """Score `tasks` through lm-eval on the in-memory model; returns scores per task and the tasks skipped, with why.

    `limit` takes the fixed sample `sample_ids` of each split. With `cache_dir`, each task's per-item scores are
    written to `<cache_dir>/<task>.jsonl` and reused when the same documents are asked for again (resume)."""
    from lm_eval.evaluator import evaluate as lm_eval_evaluate
    from lm_eval.tasks import TaskManager

    from safeunits.eval.scoring_lm import ScoringLM

    for name in tasks:
        zero_shot_task(name)
    manager = TaskManager(include_defaults=False)
    scores: dict[str, TaskScores] = {}
    skipped: dict[str, str] = {}
    configs: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    samples: dict[str, list[int]] = {}
    doc_ids: dict[str, list[int] | None] = {}
    for name in tasks:
        ids = sample_ids(TASKS[name].rows, limit)
        cfg, source = task_config(name, data_dir, ids)
        if source.startswith("local:") and num_fewshot:
            raise UserValueError(f"{name}: few-shot needs the training split, which the local copy lacks",
                                 hint="use num_fewshot: 0 (the papers' zero-shot setting)")
        cached = _read_cache(cache_dir, name, ids, source, TASKS[name].rows)
        if cached is not None:
            scores[name] = cached
            continue
        configs[name], sources[name], doc_ids[name] = {**cfg, "num_fewshot": num_fewshot}, source, ids
        if ids is not None and source.startswith("hub:"):
            samples[name] = ids
    if configs:
        lm_logger = logging.getLogger("lm_eval")  # its per-task notes about our custom data source are noise here
        level = lm_logger.level
        lm_logger.setLevel(logging.ERROR)
        try:
            task_dict = manager.load(list(configs.values()))
            lm = ScoringLM(model, tokenizer, batch_size=batch_size, progress=progress)
            out = lm_eval_evaluate(lm, task_dict, samples=samples or None, log_samples=True, bootstrap_iters=0,
                                   verbosity="ERROR")
        except (ConnectionError, OSError) as err:  # a Hub task offline: say so, keep the rest of the evaluation
            skipped.update({name: f"{type(err).__name__}: {err}" for name in configs})
            return scores, skipped
        finally:
            lm_logger.setLevel(level)
        for name in configs:
            task = task_dict["tasks"][name]
            ids = doc_ids[name] if name not in samples else None
            items = [_item(task, s, ids) for s in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
            scores[name] = TaskScores(name, sources[name], TASKS[name].rows, items)
            _write_cache(cache_dir, scores[name])
    return {name: scores[name] for name in tasks if name in scores}, skipped


def accuracy_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: LMEvalConfig,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> AccuracyMetrics:
    """A suite's `lm_eval` tasks as the `utility.accuracy` of metrics.json (what `evaluate` calls)."""
    scores, skipped = run_zero_shot(model, tokenizer, config.tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                                    data_dir=data_dir, batch_size=config.batch_size, cache_dir=cache_dir,
                                    progress=progress)
    return AccuracyMetrics(tasks={name: task_accuracy(s) for name, s in scores.items()}, skipped=skipped,
                           num_fewshot=config.num_fewshot, lm_eval_version=lm_eval_version())


def task_accuracy(scores: TaskScores) -> TaskAccuracy:
    """Per-item verdicts into the Rates of metrics.json (recomputable from `zero_shot/<task>.jsonl`)."""
    norm = [i.acc_norm for i in scores.items]
    return TaskAccuracy.from_verdicts(scores.source, scores.split_size, [i.doc_id for i in scores.items],
                                      [i.acc for i in scores.items], None if None in norm else norm)


def _item(task, sample: dict[str, Any], ids: list[int] | None) -> ItemScore:
    """One logged lm-eval sample; `ids` maps the index among the documents handed over to the split's index."""
    doc = sample["doc"]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    doc_id = int(sample["doc_id"])
    return ItemScore(doc_id=ids[doc_id] if ids is not None else doc_id, target=int(gold),
                     lls=[float(r[0]) for r in sample["filtered_resps"]], acc=bool(sample["acc"]),
                     acc_norm=bool(sample["acc_norm"]) if "acc_norm" in sample else None)


def _write_cache(cache_dir: Path | None, scores: TaskScores) -> None:
    if cache_dir is None:
        return
    head = {"task": scores.task, "source": scores.source, "split_size": scores.split_size}
    text = json.dumps(head) + "\n" + "".join(json.dumps(i.to_json()) + "\n" for i in scores.items)
    write_text(cache_dir / f"{scores.task}.jsonl", text)


def _read_cache(cache_dir: Path | None, name: str, ids: list[int] | None, source: str,
                split_size: int) -> TaskScores | None:
    path = cache_dir / f"{name}.jsonl" if cache_dir is not None else None
    if path is None or not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    head, rows = lines[0], lines[1:]
    want = ids if ids is not None else list(range(split_size))
    if head.get("source") != source or [r["doc_id"] for r in rows] != want:
        return None
    return TaskScores(name, source, head["split_size"], [ItemScore(**r) for r in rows])


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
