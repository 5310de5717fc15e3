"""Multi-process runs, launched for real (2 CPU processes, gloo): DDP and FSDP2 training equal one process,
frozen weights stay bit-identical, unit scoring reduces to the single-process unit map, bad setups are refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from dist_worker import frozen_masks, run
from safeunits.distributed import DistributedSetupError, check_world
from safeunits.io import load_safetensors
from safeunits.train.engine import TrainConfig, train
from tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKER = str(ROOT / "tests" / "dist_worker.py")
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED")


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(args: list[str], *, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a launcher command as a new user would, with this checkout's code and one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _accelerate(*flags: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", *flags, "--num_processes", "2", "--main_process_port", _free_port()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def single(model_dir) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The masked reference: one process, micro-batches twice as large, so the global step is the same 8 examples."""
    return run(model_dir, batch_size=4, masked=True)


def _check_against_single(out: Path, single, model_dir: Path, *, sharded: bool) -> None:
    weights = load_safetensors(out)
    with safe_open(str(out), "pt") as f:
        info = f.metadata()
    assert info["processes"] == "2" and info["sharded"] == str(sharded) and info["steps"] == "3"
    ref, ref_info = single
    assert [float(x) for x in info["losses"].split(",")] == pytest.approx(
        [float(x) for x in ref_info["losses"].split(",")], rel=1e-5)
    initial = tiny_model("llama").state_dict()  # the weights saved in model_dir
    masks = frozen_masks(tiny_model("llama"))
    assert set(weights) == set(ref)
    for name, w in weights.items():
        torch.testing.assert_close(w, ref[name], rtol=1e-5, atol=1e-6)
        mask = masks.get(name)
        if mask is not None:
            assert torch.equal(w[mask], initial[name][mask]), f"frozen entries of {name} changed"
            if not mask.all():
                assert not torch.equal(w[~mask], initial[name][~mask]), f"{name} did not train"


def test_ddp_two_processes_equal_one_process(model_dir, single, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine: 2 gloo processes, the global batch's
    update (exact token weighting across processes, one LR-schedule step per step), frozen weights bit-identical;
    the final checkpoint is saved by both processes together (a collective), written once."""
    out = tmp_path / "ddp.safetensors"
    _launch(_accelerate("--multi_gpu") + [WORKER, str(model_dir), str(out), "--batch-size", "2", "--masked",
                                          "--checkpoint-dir", str(tmp_path / "ckpt")])
    _check_against_single(out, single, model_dir, sharded=False)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-3"]
    assert json.loads((tmp_path / "ckpt" / "step-3" / "trainer_state.json").read_text())["step"] == 3


def test_fsdp2_masks_two_processes(model_dir, single, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2`: DTensor-sharded weights and masks, same result as one process."""
    out = tmp_path / "fsdp.safetensors"
    _launch(_accelerate("--use_fsdp", "--fsdp_version", "2") +
            [WORKER, str(model_dir), str(out), "--batch-size", "2", "--masked"])
    _check_against_single(out, single, model_dir, sharded=True)


def test_unit_scoring_under_torchrun_equals_one_process(model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m safeunits attribute`: each process scores half, statistics are reduced, the
    main process writes the same unit map as a single-process run."""
    from safeunits.cli import app

    for name, word in (("safety", "No"), ("utility", "Sure")):
        rows = [{"prompt": f"Request {i}: do thing {i}", "response": f"{word}, " * (2 + i % 5) + str(i)}
                for i in range(10)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["attribute", "--model", str(model_dir), "--safety-data", str(tmp_path / "safety.jsonl"),
            "--utility-data", str(tmp_path / "utility.jsonl"), "--batch-size", "2", "--no-plots", "--quiet"]
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port(), "-m", "safeunits",
             *args, "--out", str(tmp_path / "two")])
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    two, one = (load_safetensors(tmp_path / d / "unit_map.safetensors") for d in ("two", "one"))
    assert set(two) == set(one)
    for key in one:
        if key.endswith(".class"):
            assert torch.equal(two[key], one[key]), key
        else:
            # float64 statistics of float32 activations; the shards pad their batches differently
            torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=0)


def test_accelerate_cpu_num_processes_is_refused(model_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: refused, with the command that works."""
    proc = _launch(_accelerate("--cpu") + [WORKER, str(model_dir), str(tmp_path / "x.safetensors"), "--batch-size", "2"],
                   ok=False)
    assert proc.returncode != 0 and "starts ONE process" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_world_size_mismatch_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="launcher started 2 processes .* Accelerate sees 1"):
        check_world(1)


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FlatParameter"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed ZeRO"),
])
def test_masked_training_refused_where_it_cannot_be_exact(monkeypatch, env, match):
    """FSDP1 and DeepSpeed flatten/partition parameters: a masked run is refused before anything is built."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DistributedSetupError, match=match):
        train(model, tok, [_record()], TrainConfig(max_steps=1, mixed_precision="no"), frozen=frozen_masks(model),
              progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fsdp1_on_cpu_processes_is_refused_not_replaced(monkeypatch):
    """Accelerate cannot run FSDP1 on CPU processes and would silently do DDP: refused, even unmasked."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(DistributedSetupError, match="fsdp_version 2"):
        train(tiny_model("llama"), tiny_tokenizer(), [_record()], TrainConfig(max_steps=1, mixed_precision="no"),
              progress=False)


def test_python_dash_m_safeunits_cli():
    """`python -m safeunits.cli` is the CLI too (`-m safeunits` is what the torchrun test starts)."""
    proc = _launch([sys.executable, "-m", "safeunits.cli", "--help"])
    assert "attribute" in proc.stdout and "train" in proc.stdout


def _record():
    from safeunits.data.records import Record

    return Record(prompt="What is 2 plus 2?", response="It is 4.")


def test_frozen_lines_follow_dtensor_shards():
    """Frozen rows/columns mapped to each process's DTensor shard (what `MaskedUpdate.shard` does under FSDP2) are
    exactly the dense mask cut like the parameter: even and uneven sizes, rows and columns, either shard dim."""
    proc = _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port(),
                    str(ROOT / "tests" / "dist_parts_worker.py")])
    assert proc.stdout.count("12 cases ok") == 2, proc.stdout


def test_sharded_eval_under_torchrun_equals_one_process(data_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m safeunits eval`: each process answers and scores half of every set, one run
    folder is written (by the main process), and its metrics and answers equal a one-process run's."""
    from safeunits.cli import app
    from tiny import tiny_model as make

    model_dir = tmp_path / "model"
    make("llama", initializer_range=0.2, max_position_embeddings=4096).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = ["eval", "--model", str(model_dir), "--suite", "quick", "--limit", "5", "--max-new-tokens", "6",
            "--data-dir", str(data_dir), "--quiet", "--set", "nll_max_length=4096"]
    _launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", _free_port(), "-m", "safeunits",
             *args, "--out", str(tmp_path / "two")])
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (two["environment"]["processes"], one["environment"]["processes"]) == (2, 1)
    assert two["headline"] == pytest.approx(one["headline"], rel=1e-6)
    for key in ("safety", "over_safety"):
        assert two[key] == one[key], key
    for name, got in two["utility"]["sets"].items():
        ref = one["utility"]["sets"][name]
        assert got["per_record_tokens"] == ref["per_record_tokens"]
        assert got["per_record_nll"] == pytest.approx(ref["per_record_nll"], rel=1e-5)
    files = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*.jsonl"))
    assert files and files == sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*.jsonl"))
    for rel in files:
        rows = [json.loads(line) for line in (tmp_path / "two" / rel).read_text().splitlines()]
        ref = [json.loads(line) for line in (tmp_path / "one" / rel).read_text().splitlines()]
        # zero_shot/ rows have no "index" but a doc_id; their log-likelihoods differ in the last float bits when the
        # processes run other thread counts (torchrun sets OMP_NUM_THREADS=1), so they are compared to 1e-5
        order = lambda r: (r.get("index", -1), r.get("doc_id", -1))  # noqa: E731
        got, want = sorted(rows, key=order), sorted(ref, key=order)
        for g, w in zip(got, want):
            if "lls" in w:
                assert g.pop("lls") == pytest.approx(w.pop("lls"), rel=1e-5), rel
        assert got == want, rel
