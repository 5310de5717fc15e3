"""Patch methods by name, and the weight-space ones: task arithmetic θ_B + Σ λ_i δ_i and TIES merging.

Every method turns the dense patches (δ_SE, δ_OSM, optionally δ_NPO) into a SparsePatch (the additive
change, or None for the untouched backbone), so each is applied, saved and evaluated the same way as
SafePatching's controllable merge. Task arithmetic and TIES work tensor by tensor from the memory-mapped
patch folders. A new method is one `@register_patch_method` entry at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch
from pydantic import Field, field_validator

from safeunits.config import Config
from safeunits.errors import UserValueError
from safeunits.io import stream_tensors
from safeunits.models.signature import check_fits
from safeunits.patching.merge import MergeConfig, controllable_merge
from safeunits.patching.patches import DensePatch
from safeunits.patching.sparse import SparsePatch, SparseTensorDelta, _index_dtype
from safeunits.registry import Registry


def _common(patches: list[DensePatch]) -> list[str]:
    if not patches:
        raise ValueError("no patches given")
    for p in patches[1:]:
        check_fits(p.signature, patches[0].signature, what=f"patch {p.folder}", on=f"patch {patches[0].folder}")
    names = [n for n in patches[0].names if all(n in set(p.names) for p in patches[1:])]
    if not names:
        raise ValueError("the patches share no tensors")
    return names


def _sparse(name: str, dense: torch.Tensor) -> SparseTensorDelta:
    flat = dense.reshape(-1)
    idx = torch.nonzero(flat).reshape(-1)
    return SparseTensorDelta(_index_dtype(idx, flat.numel()), flat[idx].float().clone(), tuple(dense.shape))


def task_arithmetic(patches: list[DensePatch], weights: list[float], *, progress: bool = True) -> SparsePatch:
    """Σ_i λ_i δ_i (Ilharco et al. 2023): λ = 1 on δ_SE alone is the GA baseline, on δ_OSM the GD baseline."""
    if len(weights) != len(patches):
        raise ValueError(f"{len(weights)} weights for {len(patches)} patches")
    names = _common(patches)
    deltas = {}
    for name in stream_tensors(names, "task arithmetic", progress=progress):
        total = weights[0] * patches[0].delta(name).float()
        for w, p in zip(weights[1:], patches[1:]):
            total = total + w * p.delta(name).float()
        deltas[name] = _sparse(name, total)
    return SparsePatch(deltas, patches[0].signature, {
        "method": "task_arithmetic", "weights": weights, "patches": [str(p.folder) for p in patches],
        "backbone_fingerprint": patches[0].manifest.get("backbone_fingerprint")})


class TiesConfig(Config):
    """TIES merging (Yadav et al. 2023): trim, elect sign, disjoint mean."""

    density: float = Field(0.2, gt=0, le=1, description="share of each task vector kept by magnitude (per tensor)")
    weights: list[float] | None = Field(None, description="per-patch weights (default 1 each)")
    lam: float = Field(1.0, description="scale of the merged task vector")
    normalize: bool = Field(True, description="divide by the summed weights of the agreeing patches (disjoint mean)")


def ties_tensor(deltas: list[torch.Tensor], config: TiesConfig) -> torch.Tensor:
    """TIES on one tensor: keep each δ's top-`density` magnitudes, elect the sign of Σ, average those that agree."""
    weights = config.weights or [1.0] * len(deltas)
    trimmed = []
    for d in deltas:
        flat = d.float().reshape(-1)
        k = max(1, round(config.density * flat.numel()))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
        trimmed.append(torch.where(keep, flat, torch.zeros_like(flat)))
    stacked = torch.stack([w * t for w, t in zip(weights, trimmed)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0)
    if config.normalize:
        wsum = (torch.tensor(weights).view(-1, 1) * agree).sum(0)
        merged = torch.where(wsum > 0, merged / wsum.clamp_min(1e-12), torch.zeros_like(merged))
    return (config.lam * merged).view(deltas[0].shape)


def ties_merge(patches: list[DensePatch], config: TiesConfig | None = None, *, progress: bool = True) -> SparsePatch:
    """TIES merge of several dense patches (e.g. δ_SE and δ_OSM) into one sparse patch."""
    config = config or TiesConfig()
    names = _common(patches)
    deltas = {n: _sparse(n, ties_tensor([p.delta(n) for p in patches], config))
              for n in stream_tensors(names, "TIES", progress=progress)}
    return SparsePatch(deltas, patches[0].signature, {
        "method": "ties", "ties_config": config.model_dump(mode="json"), "patches": [str(p.folder) for p in patches],
        "backbone_fingerprint": patches[0].manifest.get("backbone_fingerprint")})


# --- the registry of patch methods (SafePatching Table 1's baselines) -------------------------------


class UnknownPatchMethodError(UserValueError):
    """A patch method name that no `register_patch_method` entry has."""


class MissingPatchError(UserValueError):
    """A method needs a dense patch (e.g. δ_NPO) that was not given."""


@dataclass(frozen=True)
class PatchSources:
    """The dense patches a method may combine, each derived from the backbone by `patch derive`."""

    se: DensePatch  # safety patch δ_SE (objective ascent)
    osm: DensePatch  # over-safety patch δ_OSM (objective descent)
    npo: DensePatch | None = None  # NPO patch δ_NPO (objective npo), only for methods that need it


_DERIVED_BY = {"se": "ascent", "osm": "descent", "npo": "npo"}  # PatchSources field -> `patch derive --objective`

PatchBuilder = Callable[[PatchSources, "BaselinesConfig"], SparsePatch | None]


@dataclass(frozen=True)
class PatchMethod:
    """A named way of turning dense patches into the change to evaluate (None: evaluate the backbone itself)."""

    name: str
    description: str
    build: PatchBuilder
    needs: tuple[str, ...] = ()  # PatchSources fields that must not be None

    def check(self, sources: PatchSources) -> None:
        """Fail before any evaluation runs when a patch this method needs is missing."""
        for need in self.needs:
            if getattr(sources, need) is None:
                raise MissingPatchError(f"the {self.name} method needs the {need} patch: derive it with "
                                        f"`safeunits patch derive --objective {_DERIVED_BY[need]}`")

    def __call__(self, sources: PatchSources, config: BaselinesConfig) -> SparsePatch | None:
        self.check(sources)
        return self.build(sources, config)


_PATCH_METHODS: Registry[PatchMethod] = Registry(
    "patch method", error=UnknownPatchMethodError, hint="or register one with safeunits.patching.methods.register_patch_method")


def register_patch_method(name: str, description: str, *,
                          needs: tuple[str, ...] = ()) -> Callable[[PatchBuilder], PatchBuilder]:
    """Decorator: make `build(sources, config)` selectable as baseline method `name`."""
    unknown = sorted(set(needs) - set(_DERIVED_BY))
    if unknown:
        raise ValueError(f"patch method {name!r} needs unknown sources {unknown}; choose from {', '.join(_DERIVED_BY)}")

    def register(build: PatchBuilder) -> PatchBuilder:
        _PATCH_METHODS.add(name, PatchMethod(name, description, build, needs))
        return build

    return register


def patch_method_names() -> list[str]:
    """Registered patch method names, in registration order."""
    return _PATCH_METHODS.names()


def get_patch_method(name: str) -> PatchMethod:
    """The method registered as `name`; unknown names list the known ones."""
    return _PATCH_METHODS.get(name)


def build_method_patch(method: str, sources: PatchSources, config: BaselinesConfig) -> SparsePatch | None:
    """The additive patch `method` applies to the backbone (None for the untouched backbone)."""
    return get_patch_method(method)(sources, config)


@register_patch_method("none", "the backbone, untouched")
def _none(sources: PatchSources, config: BaselinesConfig) -> None:
    return None


@register_patch_method("ga", "gradient ascent: θ_B + δ_SE")
def _ga(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return task_arithmetic([sources.se], [1.0], progress=False)


@register_patch_method("gd", "gradient descent on the over-safety data: θ_B + δ_OSM")
def _gd(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return task_arithmetic([sources.osm], [1.0], progress=False)


@register_patch_method("npo", "Negative Preference Optimization: θ_B + δ_NPO", needs=("npo",))
def _npo(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return task_arithmetic([sources.npo], [1.0], progress=False)


@register_patch_method("task_arithmetic", "task arithmetic of both patches: θ_B + λ·(δ_SE + δ_OSM) "
                                          "(task_arithmetic_lambda), SafePatching's comparison")
def _task_arithmetic(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    lam = config.task_arithmetic_lambda
    return task_arithmetic([sources.se, sources.osm], [lam, lam], progress=False)


@register_patch_method("task_arithmetic_se", "task arithmetic of the safety patch alone: θ_B + λ·δ_SE (the baseline "
                                             "before issue 24)")
def _task_arithmetic_se(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return task_arithmetic([sources.se], [config.task_arithmetic_lambda], progress=False)


@register_patch_method("ties", "TIES merge of δ_SE and δ_OSM (ties)")
def _ties(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return ties_merge([sources.se, sources.osm], config.ties, progress=False)


@register_patch_method("safepatching", "SafePatching's controllable merge of δ_SE and δ_OSM (merge)")
def _safepatching(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return controllable_merge(sources.se, sources.osm, config.merge, progress=False)


@register_patch_method("intersection", "ablation of SafePatching: both patches on the weights salient to both, "
                                       "top-a(SE) ∩ top-b(OSM), with merge's a, b, α, β, DARE p")
def _intersection(sources: PatchSources, config: BaselinesConfig) -> SparsePatch:
    return controllable_merge(sources.se, sources.osm, config.merge.model_copy(update={"sets": "intersection"}),
                              progress=False)


# after every registration above: the default method list is the registry's
class BaselinesConfig(Config):
    """Which methods, and their hyper-parameters."""

    methods: list[str] = Field(default_factory=patch_method_names, description="registered patch methods "
                               f"(patching.methods): {', '.join(patch_method_names())}")
    task_arithmetic_lambda: float = Field(0.5, description="λ of task arithmetic: θ_B + λ·(δ_SE + δ_OSM), and "
                                                           "θ_B + λ·δ_SE for task_arithmetic_se (λ = 1 is GA itself)")
    ties: TiesConfig = Field(default_factory=TiesConfig, description="TIES merge of δ_SE and δ_OSM")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="SafePatching's (a, b, α, β) (from the sweep)")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str]) -> list[str]:
        for name in names:
            get_patch_method(name)
        return names
