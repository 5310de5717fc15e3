"""Zero-shot task accuracy: the local splits, lm-eval's prompts on them, and the scorer against direct log-likelihoods."""

from __future__ import annotations

import re

import pytest
import torch

from safeunits.data.zero_shot import TASKS, load_zero_shot_docs


def readme_rows(data_dir) -> dict[str, int]:
    """First file of each `zero_shot/` row of the data README -> its first row count."""
    rows = {}
    for line in (data_dir / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `zero_shot/([^`]+)`.*?\|.*?\| ([\d,]+)", line)
        if m:
            rows[m.group(1)] = int(m.group(2).replace(",", ""))
    return rows


def test_every_local_split_has_the_readme_row_count(data_dir):
    rows = readme_rows(data_dir)
    assert {t.files[0] for t in TASKS.values()} == set(rows)  # every zero_shot file of the README has a loader
    for name, task in TASKS.items():
        docs = load_zero_shot_docs(name, data_dir)
        assert len(docs) == rows[task.files[0]] == task.rows, name


def test_local_documents_carry_the_hub_fields(data_dir):
    """Spot checks against the files: gold answers map to the fields lm-eval's configs read."""
    arc = load_zero_shot_docs("arc_easy", data_dir)
    assert arc[0]["question"].startswith("Which statement best explains") and arc[0]["answerKey"] == "A"
    assert all(d["answerKey"] in d["choices"]["label"] for d in arc)
    challenge = load_zero_shot_docs("arc_challenge", data_dir)
    assert {len(d["choices"]["text"]) for d in challenge} >= {4}
    assert all(d["answerKey"] in d["choices"]["label"] for d in challenge)
    hs = load_zero_shot_docs("hellaswag", data_dir)
    assert hs[0]["activity_label"] == "Roof shingle removal" and len(hs[0]["endings"]) == 4 and hs[0]["label"] == "3"
    rte = load_zero_shot_docs("rte", data_dir)
    assert rte[0]["label"] == 1 and rte[1]["label"] == 0  # not_entailment, entailment (GLUE ids)
    wino = load_zero_shot_docs("winogrande", data_dir)
    assert wino[0]["answer"] == "2" and "_" in wino[0]["sentence"]
    mmlu = load_zero_shot_docs("mmlu", data_dir)
    assert len({d["subject"] for d in mmlu}) == 57 and {d["answer"] for d in mmlu} == {0, 1, 2, 3}


# ---- scoring through lm-eval on a tiny random model -------------------------------------------------------------

def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), from one plain forward pass of context + continuation."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ctx), len(ids))))


def prompts(task: str, doc: dict) -> tuple[list[tuple[str, str]], int, list[str]]:
    """(context, continuation) per choice, the gold index and the choice texts, written out from lm-eval's task
    YAMLs independently of lm-eval (arc: "Question: ...\\nAnswer:", openbookqa: the stem, winogrande: partial)."""
    if task == "winogrande":
        cut = doc["sentence"].index("_")
        rest = " " + doc["sentence"][cut + 1:].strip()
        options = [doc["option1"], doc["option2"]]
        return [(doc["sentence"][:cut] + o, rest) for o in options], int(doc["answer"]) - 1, options
    texts = doc["choices"]["text"]
    gold = doc["choices"]["label"].index(doc["answerKey"].strip())
    context = f"Question: {doc['question']}\nAnswer:" if task.startswith("arc") else doc["question_stem"]
    return [(context, " " + t) for t in texts], gold, texts


@pytest.fixture(scope="module")
def tiny():
    from tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama", max_position_embeddings=512), tiny_tokenizer()


def test_choices_are_the_argmax_of_direct_loglikelihoods(tiny, data_dir):
    from safeunits.eval.zero_shot import run_zero_shot, sample_ids

    model, tok = tiny
    tasks = ["arc_challenge", "openbookqa", "winogrande"]
    scores, skipped = run_zero_shot(model, tok, tasks, limit=5, data_dir=data_dir, batch_size=4, progress=False)
    assert not skipped and list(scores) == tasks
    for task in tasks:
        docs = load_zero_shot_docs(task, data_dir)
        assert [i.doc_id for i in scores[task].items] == sample_ids(TASKS[task].rows, 5)
        for item in scores[task].items:
            pairs, gold, texts = prompts(task, docs[item.doc_id])
            direct = [direct_loglikelihood(model, tok, c, x) for c, x in pairs]
            assert item.lls == pytest.approx(direct, abs=2e-4)
            assert item.target == gold
            pred = max(range(len(direct)), key=direct.__getitem__)
            assert item.acc == (pred == gold)
            if item.acc_norm is not None:  # lm-eval: log-likelihood over the choice's length in characters
                pred_norm = max(range(len(direct)), key=lambda k: direct[k] / len(texts[k]))
                assert item.acc_norm == (pred_norm == gold)
        assert (scores[task].items[0].acc_norm is None) == (task == "winogrande")  # lm-eval: acc only


def test_scoring_lm_reproduces_hflm(tiny, data_dir, monkeypatch):
    """ScoringLM (each context once, cache repeated per choice) gives lm-eval's HFLM log-likelihoods and verdicts."""
    from lm_eval.models.huggingface import HFLM

    from safeunits.eval import scoring_lm
    from safeunits.eval.zero_shot import run_zero_shot

    model, tok = tiny
    tasks = ["hellaswag", "piqa", "rte"]  # 4 and 2 multi-token endings; single-token True/False
    ours, _ = run_zero_shot(model, tok, tasks, limit=6, data_dir=data_dir, batch_size=5, progress=False)
    monkeypatch.setattr(scoring_lm, "ScoringLM",
                        lambda m, t, batch_size, progress: HFLM(pretrained=m, tokenizer=t, batch_size=batch_size))
    ref, _ = run_zero_shot(model, tok, tasks, limit=6, data_dir=data_dir, batch_size=5, progress=False)
    for task in tasks:
        for a, b in zip(ours[task].items, ref[task].items, strict=True):
            assert a.doc_id == b.doc_id and a.target == b.target
            assert a.lls == pytest.approx(b.lls, abs=2e-4)
            assert (a.acc, a.acc_norm) == (b.acc, b.acc_norm)


def test_a_rerun_reads_the_kept_scores(tiny, data_dir, tmp_path, monkeypatch):
    from safeunits.eval import scoring_lm
    from safeunits.eval.zero_shot import run_zero_shot

    model, tok = tiny
    first, _ = run_zero_shot(model, tok, ["openbookqa"], limit=3, data_dir=data_dir, cache_dir=tmp_path, progress=False)
    assert (tmp_path / "openbookqa.jsonl").is_file()

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(scoring_lm, "ScoringLM", no_scoring)
    again, _ = run_zero_shot(model, tok, ["openbookqa"], limit=3, data_dir=data_dir, cache_dir=tmp_path, progress=False)
    assert again["openbookqa"].items == first["openbookqa"].items


# ---- paired tests between two runs on the same documents ---------------------------------------------------------

def accuracy(tasks: dict[str, tuple[list[int], list[bool]]]):
    from safeunits.eval.result import AccuracyMetrics, TaskAccuracy

    return AccuracyMetrics(tasks={t: TaskAccuracy.from_verdicts("local:x", 100, ids, correct, None)
                                  for t, (ids, correct) in tasks.items()})


def test_accuracy_is_compared_pairwise_per_task():
    from scipy.stats import binomtest

    from safeunits.eval.significance import ACCURACY_ALL, PairingError, accuracy_deltas

    ids = list(range(40))
    base = accuracy({"arc_easy": (ids, [True] * 30 + [False] * 10), "boolq": (ids, [True] * 20 + [False] * 20)})
    # arc_easy: 12 documents lost, 1 gained; boolq: the same verdicts
    other = accuracy({"arc_easy": (ids, [True] * 18 + [False] * 12 + [True] + [False] * 9),
                      "boolq": (ids, [True] * 20 + [False] * 20)})
    deltas = {d.metric: d for d in accuracy_deltas(base, other)}
    arc = deltas["acc arc_easy"]
    assert arc.discordant == (12, 1) and arc.delta == pytest.approx(-11 / 40)
    assert arc.p_value == pytest.approx(binomtest(1, 13, 0.5).pvalue) and arc.significant
    assert deltas["acc boolq"].p_value == 1.0 and not deltas["acc boolq"].significant
    mean = deltas[ACCURACY_ALL]
    assert mean.delta == pytest.approx(-11 / 80) and mean.ci95[1] < 0 and mean.significant
    shifted = accuracy({"arc_easy": ([i + 1 for i in ids], other.tasks["arc_easy"].correct)})
    with pytest.raises(PairingError):
        accuracy_deltas(base, shifted)
