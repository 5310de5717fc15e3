"""Training objectives by name: what the engine minimises on each micro-batch of an optimizer step.

An objective is one small class registered with `@register_objective`; it declares what it needs from the
engine (a frozen reference model's response log-probs, a per-sequence rather than per-token average) and
turns one forward pass into a loss. The engine (`train.engine`) does everything else: accumulation, masks,
clipping, checkpoints. `TrainConfig.objective` accepts any registered name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import torch
import torch.nn.functional as F

from safeunits.errors import UserValueError
from safeunits.registry import Registry


class ObjectiveSettings(Protocol):
    """What objectives read from the training config (`train.engine.TrainConfig` satisfies it)."""

    npo_beta: float


class UnknownObjectiveError(UserValueError):
    """A training objective name that no `register_objective` entry has."""


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch's forward pass, as an objective sees it."""

    token_nll: torch.Tensor  # (batch, seq - 1) per-token NLL, 0 where a token carries no loss
    nll_sum: torch.Tensor  # token_nll.sum(): the micro-batch's summed response NLL
    seq_logp: torch.Tensor  # (batch,) each sequence's response log-prob under the weights being trained
    ref_logp: torch.Tensor | None  # (batch,) the same under the frozen initial weights (needs_reference only)
    denom: float  # loss tokens (sequences when per_sequence) of the whole optimizer step, all micro-batches and
    # processes, divided by the number of processes (data parallelism averages their gradients)


class TrainingObjective(ABC):
    """Base of every objective: the class attributes declare its needs, `loss` computes one micro-batch's share.

    Losses are sums over the micro-batch divided by `denom`, the count over the whole optimizer step, so
    gradient accumulation optimises exactly the objective of one big batch.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_reference: ClassVar[bool] = False  # response log-probs under the frozen initial weights, computed once
    per_sequence: ClassVar[bool] = False  # average over sequences instead of loss tokens
    raises_nll: ClassVar[bool] = False  # drives the response NLL up, so `stop_nll_above` may bound it

    def __init__(self, config: ObjectiveSettings) -> None:
        self.config = config

    @abstractmethod
    def loss(self, inputs: LossInputs) -> torch.Tensor:
        """The scalar to back-propagate for this micro-batch."""


_OBJECTIVES: Registry[type[TrainingObjective]] = Registry(
    "training objective", error=UnknownObjectiveError, hint="or register one with safeunits.train.objectives.register_objective")
T = TypeVar("T", bound=type[TrainingObjective])


def register_objective(cls: T) -> T:
    """Class decorator: make `cls` selectable as `TrainConfig(objective=cls.name)`."""
    return _OBJECTIVES.add(cls.name, cls)


def objective_names() -> list[str]:
    """Registered objective names, in registration order."""
    return _OBJECTIVES.names()


def get_objective(name: str) -> type[TrainingObjective]:
    """The objective class registered as `name`; unknown names list the known ones."""
    return _OBJECTIVES.get(name)


@register_objective
class Descent(TrainingObjective):
    name = "descent"
    description = "minimise the response NLL (SFT, fine-tuning attacks, SafePatching's over-safety patch)"

    def loss(self, inputs: LossInputs) -> torch.Tensor:
        return inputs.nll_sum / max(inputs.denom, 1)


@register_objective
class Ascent(TrainingObjective):
    name = "ascent"
    description = "maximise the response NLL (unlearning, SafePatching's safety patch)"
    raises_nll = True

    def loss(self, inputs: LossInputs) -> torch.Tensor:
        return -inputs.nll_sum / max(inputs.denom, 1)


@register_objective
class NPO(TrainingObjective):
    """Negative Preference Optimization (Zhang et al. 2024): (2/β)·log(1 + (π_θ/π_ref)^β) per sequence."""

    name = "npo"
    description = "Negative Preference Optimization: push the responses below a frozen reference (npo_beta)"
    needs_reference = True
    per_sequence = True
    raises_nll = True

    def loss(self, inputs: LossInputs) -> torch.Tensor:
        beta = self.config.npo_beta
        ratio = inputs.seq_logp - inputs.ref_logp
        return (-(2.0 / beta) * F.logsigmoid(-beta * ratio)).sum() / inputs.denom
