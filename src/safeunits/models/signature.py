"""Which model an artifact fits: the architecture signature, the weight fingerprint, and the one fit check.

An artifact computed on a model (a unit map, a patch) only makes sense on a model with the same
architecture: the same ``model_type``, the same attention head layout (query and key/value head
counts: they cut weights into heads, and equal shapes do not imply equal heads) and the same shape for
every tensor of the state dict. That is the **architecture description** (:func:`architecture_description`,
a JSON-able dict); its hash is the **architecture signature** (:func:`architecture_signature`, a short
hex string). Unit maps store the signature, patches the full description (so a mismatch can name the
tensor, and a checkpoint folder can be checked from its config and safetensors headers without loading
weights). Both are checked with :func:`check_fits`, which raises :class:`ArchitectureMismatchError`
saying what the artifact was made for and what to do. :func:`model_fingerprint` adds every weight's
bytes: it identifies one checkpoint.

Artifacts written before the head layout was recorded (unit maps' ``arch_hash``, patch descriptions
without ``heads``) hold the hash / description of model type and shapes only; :func:`check_fits` still
accepts them (checking what they recorded).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from safeunits.errors import UserValueError

ArchitectureSource = PreTrainedModel | PretrainedConfig | Mapping[str, Any]


class ArchitectureMismatchError(UserValueError):
    """An artifact (unit map, patch) was made for a model of a different architecture than the one given.

    A ValueError (callers catching that keep working) and a UserError (the CLI prints it without a traceback)."""


def attention_heads(config: PretrainedConfig | Mapping[str, Any]) -> list[int] | None:
    """[query heads, key/value heads] of a config object or a config.json dict; None when it names no head count."""
    def get(name: str) -> Any:
        return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)

    heads = get("num_attention_heads") or get("n_head")
    if not heads:
        return None
    return [int(heads), int(get("num_key_value_heads") or heads)]


def architecture_description(source: ArchitectureSource) -> dict[str, Any]:
    """Model type, head layout and every state-dict tensor's shape, of a model, a config (built on the meta device)
    or a description (normalised; ``heads`` kept only when it records one)."""
    if isinstance(source, torch.nn.Module):  # a PreTrainedModel, or anything with its `config` and state dict
        return _describe(source.config.model_type, attention_heads(source.config), source.state_dict())
    if isinstance(source, PretrainedConfig):
        with torch.device("meta"):  # shapes without allocating (or initialising) a single weight
            return architecture_description(AutoModelForCausalLM.from_config(source))
    if isinstance(source, Mapping) and "model_type" in source and isinstance(source.get("shapes"), Mapping):
        return _describe(source["model_type"], source.get("heads"), source["shapes"])
    raise TypeError(f"expected a model, a config or an architecture description dict, got {type(source).__name__}")


def _describe(model_type: str, heads: Iterable[int] | None, shapes: Mapping[str, Any]) -> dict[str, Any]:
    """The one normal form (sorted names, int lists; no ``heads`` key when unknown): equal architectures hash equal."""
    description: dict[str, Any] = {"model_type": model_type}
    if heads:
        description["heads"] = [int(h) for h in heads]
    description["shapes"] = {n: [int(d) for d in getattr(t, "shape", t)] for n, t in sorted(shapes.items())}
    return description


def _digest(description: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(description, sort_keys=True).encode(), digest_size=16).hexdigest()


def _shapes_only(description: Mapping[str, Any]) -> dict[str, Any]:
    """The description as hashed before head layouts were recorded (unit maps' ``arch_hash``, fingerprints)."""
    return {"model_type": description["model_type"], "shapes": description["shapes"]}


def architecture_signature(source: ArchitectureSource) -> str:
    """Hash of :func:`architecture_description`: equal for two models exactly when an artifact of one fits the other."""
    return _digest(architecture_description(source))


def model_fingerprint(model: PreTrainedModel, *, weights: bool = True) -> str:
    """Identity of one checkpoint: the architecture and every weight's bytes (``weights=False``: the signature)."""
    description = architecture_description(model)
    if not weights:
        return _digest(description)
    h = hashlib.blake2b(digest_size=16)  # bytes as they always were: stored fingerprints (eval runs, patches) stay valid
    h.update(json.dumps(_shapes_only(description), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_fits(
    expected: str | Mapping[str, Any],
    target: ArchitectureSource | str,
    *,
    what: str = "unit map",
    made_for: str | None = None,
    on: str = "the given model",
    names: Iterable[str] | None = None,
) -> None:
    """Raise :class:`ArchitectureMismatchError` unless `target` has the architecture the artifact `what` was made for.

    `expected` is the artifact's signature (compared whole) or its description (compared tensor by tensor,
    only the tensors in `names` when given: a patch touches some tensors, and checkpoint files omit tied
    weights). `target` is a model, a config, a description, or another signature. `made_for` describes
    the model the artifact was made for in the message; `on` names the target.
    """
    advice = f"Use the model this {what} was made for, or rebuild the {what} from the model you have."
    if isinstance(expected, str):
        have = None if isinstance(target, str) else architecture_description(target)
        actual = target if have is None else _digest(have)
        if expected != actual and (have is None or expected != _digest(_shapes_only(have))):
            kind = "" if have is None else f" (a {have['model_type']!r} model)"
            raise ArchitectureMismatchError(
                f"this {what} was computed for {made_for or 'another model'} with architecture hash {expected}, "
                f"but {on}{kind} has architecture hash {actual}: different architectures. {advice}")
        return
    if isinstance(target, str):
        raise TypeError("an architecture description can only be checked against a model, config or description")
    want, have = architecture_description(expected), architecture_description(target)
    problems = []
    if want["model_type"] != have["model_type"]:
        problems.append(f"model type {have['model_type']!r} != {want['model_type']!r}")
    if "heads" in want and "heads" in have and want["heads"] != have["heads"]:
        problems.append(f"[query, key/value] heads {have['heads']} != {want['heads']}")
    for name in (names if names is not None else want["shapes"]):
        if name not in have["shapes"]:
            problems.append(f"tensor {name} missing")
        elif have["shapes"][name] != want["shapes"].get(name):
            problems.append(f"tensor {name} has shape {have['shapes'][name]}, the {what} expects {want['shapes'].get(name)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ArchitectureMismatchError(
            f"this {what} does not fit {on}: " + "; ".join(problems[:5]) + more
            + f". It was computed for {made_for or 'a ' + repr(want['model_type']) + ' model'}. {advice}")
