"""One training run on a tiny saved model, the same code in a test process or under a real launcher.

`python dist_worker.py MODEL_DIR OUT.safetensors --batch-size B [--masked]` (under `accelerate launch` /
`torchrun`): trains with the engine and, in the main process only, saves the full trained weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from safeunits.data.records import Record  # noqa: E402
from safeunits.distributed import gather_full_state_dict, is_main_process, is_sharded  # noqa: E402
from safeunits.io import save_safetensors  # noqa: E402
from safeunits.train.engine import TrainConfig, train  # noqa: E402
from tiny import tiny_tokenizer  # noqa: E402

# response lengths differ, so the token-weighted mean of each process's share differs from the global one
RECORDS = [Record(prompt=f"Question {i}: what is {i} plus {i}?", response=f"It is {2 * i}. " * (1 + i % 4))
           for i in range(16)]


def frozen_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every third row of each matrix frozen, one norm frozen entirely: partial and full freezing, deterministic."""
    masks = {}
    for name, param in model.named_parameters():
        if param.dim() == 2:
            mask = torch.zeros_like(param, dtype=torch.bool)
            mask[::3] = True
            masks[name] = mask
        elif name == "model.norm.weight":
            masks[name] = torch.ones_like(param, dtype=torch.bool)
    return masks


def config(batch_size: int, checkpoint_dir: Path | None = None) -> TrainConfig:
    """Two micro-batches per step, decaying LR, weight decay and clipping: everything the processes must agree on."""
    return TrainConfig(lr=1e-2, max_steps=3, batch_size=batch_size, grad_accum=2, weight_decay=0.1, max_length=64,
                       warmup_ratio=0.0, scheduler="linear", seed=0, mixed_precision="no", checkpoint_dir=checkpoint_dir)


def run(model_dir: Path, batch_size: int, masked: bool,
        checkpoint_dir: Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Train the saved model: the full trained weights (under FSDP2 only rank 0 gets them) and how the run went."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    frozen = frozen_masks(model) if masked else None
    result = train(model, tiny_tokenizer(), RECORDS, config(batch_size, checkpoint_dir), frozen=frozen, progress=False)
    info = {"processes": str(PartialState().num_processes), "sharded": str(is_sharded(model)),
            "steps": str(result.steps), "losses": ",".join(f"{x:.8f}" for x in result.losses)}
    if is_sharded(model):
        return gather_full_state_dict(model), info
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--masked", action="store_true")
    parser.add_argument("--checkpoint-dir", type=Path)
    args = parser.parse_args()
    weights, info = run(args.model_dir, args.batch_size, args.masked, args.checkpoint_dir)
    if is_main_process():
        save_safetensors(args.out, weights, metadata=info)


if __name__ == "__main__":
    main()
