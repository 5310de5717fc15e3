"""The experiment schema: one typed step model per step kind (a discriminated union on `kind`).

Why typed steps: a YAML typo (an unknown field, a reference to a step that does not exist or comes later, a unit
map taken from a step that makes none) fails when the file is read, before an hour of training. A step names the
steps it consumes by their `name`; `model` may instead be a model (registered name, folder, hub id).
The `settings` of a step are the library's own config (AttributionConfig, PruneConfig, ...), so a step accepts
exactly what the library function accepts, with the same defaults and checks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safeunits.config import DEFAULT_MODEL, Config, check_keys, merge, validation_message
from safeunits.errors import ConfigError, UserFileNotFoundError
from safeunits.io import load_yaml
from safeunits.patching.harmful_data import HarmfulDataConfig
from safeunits.patching.merge import MergeConfig
from safeunits.patching.methods import BaselinesConfig
from safeunits.patching.patches import PatchConfig
from safeunits.patching.sweep import SweepConfig
from safeunits.units.attribution import AttributionConfig
from safeunits.units.probe import ProbeConfig
from safeunits.units.pruning import PruneConfig

EXPERIMENT_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"
STEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # no dots: --set steps.<name>.<field> splits on them
MODEL_MAKERS = ("align", "finetune", "attack", "apply")  # step kinds whose output is a model folder


class StepBase(Config):
    """Fields every step has. `refs` maps a field to the step kinds it may name (checked against the experiment)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=STEP_NAME, description="unique step name; also its folder under the run folder")
    refs: ClassVar[dict[str, tuple[str, ...]]] = {}
    external: ClassVar[tuple[str, ...]] = ("model",)  # fields that may name something outside the experiment
    uses_suite: ClassVar[bool] = False  # the experiment's suite (and limit) is part of the cache key
    judged_from_answers: ClassVar[bool] = False  # True: when only the judges change, the folder is kept and re-judged

    @model_validator(mode="before")
    @classmethod
    def _known_settings(cls, data: Any) -> Any:
        """Refuse unknown keys in nested library configs (pydantic would drop them and the run would ignore them)."""
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            sub = cls.model_fields["settings"].annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                check_keys(sub, data["settings"], "settings.")
        return data

    def cache_settings(self) -> dict[str, Any]:
        """Everything of the step that decides its result, defaults included (the cache key hashes it)."""
        return self.model_dump(mode="json", exclude={"name"})

    def references(self) -> dict[str, str]:
        """field -> the step name it references (empty fields and external models left out); a list field gives
        one entry per item, `field.<i>`."""
        out = {}
        for f in self.refs:
            value = getattr(self, f)
            if isinstance(value, list):
                out.update({f"{f}.{i}": ref for i, ref in enumerate(value)})
            elif value:
                out[f] = value
        model = getattr(self, "model", None)
        if model is not None and "model" not in self.refs:
            out["model"] = model  # the experiment keeps it only when it names a step
        return out


class EvalStep(StepBase):
    """The three axes of a model (optionally with a merged SafePatching patch applied) on the experiment's suite."""

    kind: Literal["eval"] = "eval"
    model: str = Field(DEFAULT_MODEL, description="an align/finetune step, or a model name/folder/hub id")
    patch: str | None = Field(None, description="a merge step whose patch is applied for this evaluation only")
    label: str | None = Field(None, description="row name in the report's table (default: the step name)")
    refs: ClassVar = {"patch": ("merge",)}
    uses_suite: ClassVar = True
    judged_from_answers: ClassVar = True  # a judge change re-judges its saved answers (nothing is generated again)


class TrainStep(StepBase):
    """What align and finetune share: a recipe, its overrides, the unit map that picks the units."""

    model: str = Field(DEFAULT_MODEL, description="the model to train: a step or a model name/folder/hub id")
    unit_map: str | None = Field(None, description="an attribute step whose unit map gives the units, or a unit map "
                                                    "file (unit_map.safetensors or its folder)")
    settings: dict[str, Any] = Field(default_factory=dict, description="recipe fields overriding the recipe YAML, "
                                     "e.g. {n_examples: 64, train: {epochs: 1}}")
    refs: ClassVar = {"unit_map": ("attribute",)}
    external: ClassVar = ("model", "unit_map")
    STEP_FIELDS: ClassVar = ("model", "unit_map", "budget", "freeze")  # set on the step, not in settings

    @model_validator(mode="after")
    def _check_recipe(self) -> TrainStep:
        from safeunits.train.recipes import load_recipe

        taken = sorted(set(self.settings) & set(self.STEP_FIELDS))
        if taken:
            raise ValueError(f"set {', '.join(taken)} on the step itself, not in settings")
        kind = load_recipe(self.recipe, self.settings).recipe
        if kind != self.kind:
            raise ValueError(f"recipe {self.recipe!r} is a recipe of kind {kind}; a {self.kind} step needs one of kind {self.kind}")
        return self

    def cache_settings(self) -> dict[str, Any]:
        """The settings plus the recipe they resolve to: a changed recipe YAML or recipe default (e.g. a new attack
        data filter) re-runs the step, as a changed typed setting of any other step kind does."""
        from safeunits.train.recipes import load_recipe

        return {**super().cache_settings(), "recipe_resolved": load_recipe(self.recipe, self.settings).model_dump(mode="json")}

    def recipe_config(self, model: str, unit_map: str | None):
        """The recipe with the settings applied, training `model` (a folder or name) with `unit_map`'s units."""
        from safeunits.train.recipes import load_recipe

        units = {"budget": self.budget} if isinstance(self, AlignStep) else {"freeze": self.freeze}
        return load_recipe(self.recipe, merge(self.settings, {"model": model, "unit_map": unit_map, **units}))


class AlignStep(TrainStep):
    """Safety SFT with a recipe (`safeunits.train.recipes`); `budget: ru` trains only those units (SSAH)."""

    kind: Literal["align"] = "align"
    recipe: str = Field("align", description="bundled recipe name (align, aligned-default, ...) or YAML path")
    budget: str | None = Field(None, description="train only these units of `unit_map`, e.g. 'ru'")

    @model_validator(mode="after")
    def _needs_map(self) -> AlignStep:
        if self.budget and not self.unit_map:
            raise ValueError("budget needs unit_map (an attribute step)")
        return self


class FinetuneStep(TrainStep):
    """Ordinary fine-tuning with a recipe; `freeze: scu+cu` keeps those units bit-identical (SSAH)."""

    kind: Literal["finetune"] = "finetune"
    recipe: str = Field("finetune", description="bundled recipe name or YAML path")
    freeze: str | None = Field(None, description="units kept frozen, e.g. 'scu+cu' or 'scu+cu:top0.06'")

    @model_validator(mode="after")
    def _needs_map(self) -> FinetuneStep:
        if self.freeze and not self.unit_map:
            raise ValueError("freeze needs unit_map (an attribute step)")
        return self


class AttackStep(FinetuneStep):
    """A fine-tuning attack (`safeunits attack`, docs/attack.md): the `attack` recipe (n examples, a share p harmful,
    full weights or LoRA), optionally under frozen units (`freeze` with `unit_map`: the defence)."""

    kind: Literal["attack"] = "attack"  # type: ignore[assignment]
    recipe: str = Field("attack", description="bundled recipe name (attack) or YAML path of an attack recipe")


class DurabilityStep(StepBase):
    """Does a defence survive fine-tuning attacks? For each defence, the worst harmful rate over the attack grid
    among attacks that keep utility (NLL within `utility_bound` of the defended model's), the paired test against
    the undefended model under the same attack, and the harmful rate against attack steps (docs/attack.md)."""

    kind: Literal["durability"] = "durability"
    defences: list[str] = Field(..., min_length=1, description="defence names, the undefended one first")
    before: list[str] = Field(..., description="per defence, the eval step of the defended model (not attacked)")
    attacks: list[str] = Field(..., description="the attack steps, defence by defence, the same grid for each")
    after: list[str] = Field(..., description="the eval step of each attacked (and repaired) model, as `attacks`")
    utility_bound: float = Field(0.10, ge=0, description="an attack counts when its utility NLL <= (1 + bound) x the "
                                                         "defended model's")
    refs: ClassVar = {"before": ("eval",), "attacks": ("attack",), "after": ("eval",)}

    @model_validator(mode="after")
    def _grid(self) -> DurabilityStep:
        n = len(self.defences)
        if len(self.before) != n:
            raise ValueError(f"before names {len(self.before)} steps for {n} defences")
        if len(self.attacks) != len(self.after) or len(self.attacks) % n or not self.attacks:
            raise ValueError("attacks and after must list the same attack grid for every defence (equal lengths, a "
                             "multiple of the number of defences)")
        return self


class AttributeStep(StepBase):
    """SSAH unit map of a model: safety and utility scores, SCU/UCU/CU/RU classes, and the map figures."""

    kind: Literal["attribute"] = "attribute"
    model: str = DEFAULT_MODEL
    settings: AttributionConfig = Field(default_factory=AttributionConfig)


class PruneStep(StepBase):
    """Pruning check: the model evaluated with each target's units zeroed (SSAH Table 1)."""

    kind: Literal["prune"] = "prune"
    model: str = DEFAULT_MODEL
    unit_map: str = Field(..., description="an attribute step (the map of this model)")
    settings: PruneConfig = Field(default_factory=PruneConfig)
    refs: ClassVar = {"unit_map": ("attribute",)}
    uses_suite: ClassVar = True


class ProbeStep(StepBase):
    """Reasoning-direction probe: is the prompt's state closer to a refusal or to a compliance?"""

    kind: Literal["probe"] = "probe"
    model: str = DEFAULT_MODEL
    prompts: str = Field("advbench", description="harmful prompts (dataset name or file)")
    limit: int = Field(32, ge=1, description="first N prompts")
    settings: ProbeConfig = Field(default_factory=ProbeConfig)


class TransferStep(StepBase):
    """Role transfer between two unit maps of the same architecture (which units changed class)."""

    kind: Literal["transfer"] = "transfer"
    before: str = Field(..., description="an attribute step (e.g. of the aligned model) or a unit map file/folder")
    after: str = Field(..., description="an attribute step (e.g. of the fine-tuned model) or a unit map file/folder")
    after_classes: Literal["thresholds", "fractions"] = Field(
        "thresholds", description="class the after-model's units by the before map's cut-offs (shares can move, "
                                  "SSAH Fig. 5) or compare each map's own fraction-sized classes (fixed shares)")
    refs: ClassVar = {"before": ("attribute",), "after": ("attribute",)}
    external: ClassVar = ("before", "after")


class HarmfulDataStep(StepBase):
    """D_h for SafePatching: harmful prompts with harmful answers (by default a prefill attack on `model`)."""

    kind: Literal["harmful-data"] = "harmful-data"
    model: str = DEFAULT_MODEL
    settings: HarmfulDataConfig = Field(default_factory=HarmfulDataConfig)


class DeriveStep(StepBase):
    """One dense patch of `model` from D_h: objective ascent (safety, δ_SE), descent (over-safety, δ_OSM) or npo."""

    kind: Literal["derive"] = "derive"
    model: str = DEFAULT_MODEL
    harmful_data: str = Field(..., description="a harmful-data step, or a D_h folder")
    settings: PatchConfig = Field(..., description="objective (required): ascent, descent or npo; train.*, saliency.*")
    refs: ClassVar = {"harmful_data": ("harmful-data",)}
    external: ClassVar = ("model", "harmful_data")


class SweepStep(StepBase):
    """Grid over (a, b, α, β) on held-out prompts: Pareto table and plot, and the chosen point."""

    kind: Literal["sweep"] = "sweep"
    model: str = DEFAULT_MODEL
    se: str = Field(..., description="a derive step (objective ascent), or a patch folder")
    osm: str = Field(..., description="a derive step (objective descent), or a patch folder")
    harmful_data: str = Field(..., description="the harmful-data step (its val split is the held-out set), or a D_h folder")
    settings: SweepConfig = Field(default_factory=SweepConfig)
    refs: ClassVar = {"se": ("derive",), "osm": ("derive",), "harmful_data": ("harmful-data",)}
    external: ClassVar = ("model", "se", "osm", "harmful_data")


class BaselinesStep(StepBase):
    """SafePatching Table 1: no intervention, GA, GD, NPO, task arithmetic, TIES and SafePatching, each applied to
    the same model and evaluated on the experiment's suite (significance against the first method)."""

    kind: Literal["baselines"] = "baselines"
    model: str = DEFAULT_MODEL
    se: str = Field(..., description="a derive step (objective ascent), or a patch folder")
    osm: str = Field(..., description="a derive step (objective descent), or a patch folder")
    npo: str | None = Field(None, description="a derive step (objective npo), or a patch folder: enables npo")
    best: str | None = Field(None, description="a sweep step: SafePatching's a, b, α, β (settings.merge still wins)")
    settings: BaselinesConfig = Field(default_factory=BaselinesConfig)
    refs: ClassVar = {"se": ("derive",), "osm": ("derive",), "npo": ("derive",), "best": ("sweep",)}
    external: ClassVar = ("model", "se", "osm", "npo")
    uses_suite: ClassVar = True


class MergeStep(StepBase):
    """Controllable merge of the two patches into one sparse SafePatching patch."""

    kind: Literal["merge"] = "merge"
    se: str = Field(..., description="a derive step (objective ascent)")
    osm: str = Field(..., description="a derive step (objective descent)")
    best: str | None = Field(None, description="a sweep step: take its chosen a, b, α, β (settings still win)")
    settings: MergeConfig = Field(default_factory=MergeConfig, description="fields given here win over the sweep's point")
    refs: ClassVar = {"se": ("derive",), "osm": ("derive",), "best": ("sweep",)}


class ApplyStep(StepBase):
    """A model with a merged SafePatching patch added to its weights, saved as a model folder (continual PSA chains
    these: each category's patch is derived on the model the previous one made)."""

    kind: Literal["apply"] = "apply"
    model: str = DEFAULT_MODEL
    patch: str = Field(..., description="a merge step whose patch is added")
    refs: ClassVar = {"patch": ("merge",)}


Step = Annotated[Union[EvalStep, AlignStep, FinetuneStep, AttackStep, AttributeStep, PruneStep, ProbeStep,
                       TransferStep, HarmfulDataStep, DeriveStep, SweepStep, MergeStep, ApplyStep, BaselinesStep,
                       DurabilityStep],
                 Field(discriminator="kind")]
STEP_CLASSES: dict[str, type[StepBase]] = {c.model_fields["kind"].default: c for c in Step.__origin__.__args__}


class Experiment(Config):
    """A named chain of steps, run in the listed order; each step may consume only earlier steps."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=STEP_NAME, description="the experiment's name (default run folder runs/<name>)")
    description: str = Field("", description="what the experiment shows (the report's first paragraph)")
    suite: str = Field("quick", description="evaluation suite of every evaluating step: quick, standard, full, or a YAML")
    limit: int | None = Field(None, ge=1, description="cut every evaluation set to N items (smoke runs)")
    data_dir: str | None = Field(None, description="offline data folder (default $SAFEUNITS_DATA_DIR)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype models load in")
    device: str = Field("cpu", description="torch device models load on (training uses the engine's device)")
    held_out_xstest: list[str] = Field([], description="XSTest prompt sets a choice was made on (e.g. a sweep's, via "
                                                         "--best): left out of every evaluation of the run")
    steps: list[Step] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _check_references(self) -> Experiment:
        kinds: dict[str, str] = {}
        for step in self.steps:
            if step.name in kinds:
                raise ValueError(f"two steps are named {step.name!r}; step names must be unique")
            for field, ref in step.references().items():
                allowed = step.refs.get(field.split(".")[0], MODEL_MAKERS)
                if ref == step.name:
                    raise ValueError(f"step {step.name!r}: {field} names the step itself")
                if ref not in kinds:
                    if field in step.external and not any(s.name == ref for s in self.steps):
                        continue  # a model name, folder or hub id; a unit map file
                    later = any(s.name == ref for s in self.steps)
                    raise ValueError(f"step {step.name!r}: {field}={ref!r} " + (
                        "comes later; a step can only use earlier steps" if later else
                        f"is not a step name (steps: {', '.join(kinds) or 'none before it'})"))
                if kinds[ref] not in allowed:
                    raise ValueError(f"step {step.name!r}: {field}={ref!r} is a step of kind {kinds[ref]}; "
                                     f"expected kind {' or '.join(allowed)}")
            kinds[step.name] = step.kind
        return self

    def step(self, name: str) -> StepBase:
        return next(s for s in self.steps if s.name == name)

    def inputs(self, step: StepBase) -> dict[str, str]:
        """field -> step name for the references of `step` that name steps of this experiment."""
        names = {s.name for s in self.steps}
        return {f: ref for f, ref in step.references().items() if ref in names}


def bundled_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def experiment_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path, or the bundled experiment of that name (`bundled_experiments()`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = EXPERIMENT_DIR / f"{name_or_path}.yaml"
    if bundled.is_file():
        return bundled
    raise UserFileNotFoundError(f"experiment {str(name_or_path)!r} is neither a file nor a bundled experiment",
                                hint=f"bundled: {', '.join(bundled_experiments())}")


def load_experiment(name_or_path: str | os.PathLike, overrides: dict | None = None) -> Experiment:
    """Read an experiment YAML and apply overrides; `steps.<name>.<field>` in the overrides reaches one step."""
    path = experiment_path(name_or_path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an experiment YAML must be a mapping with name and steps")
    return build_experiment(raw, overrides or {}, where=str(path))


def _renamed(step: dict) -> str | None:
    """The 0.1 spelling a step still uses, said in the new words (one vocabulary across CLI, Python and YAML)."""
    if step.get("kind") == "evaluate":
        return "step kind `evaluate` is now `eval` (as the command `safeunits eval`)"
    if step.get("kind") in ("derive", "sweep") and "data" in step:
        return "field `data` (a harmful-data step or D_h folder) is now `harmful_data` (`--harmful-data`)"
    return None


def build_experiment(raw: dict, overrides: dict, *, where: str = "experiment") -> Experiment:
    """Validate a raw experiment dict updated by `overrides` (step overrides keyed by step name)."""
    overrides = dict(overrides)
    step_overrides = overrides.pop("steps", {}) or {}
    unknown = set(overrides) - set(Experiment.model_fields)
    if unknown:
        raise ConfigError(f"{where}: no experiment field {', '.join(sorted(unknown))}",
                          hint=f"fields: {', '.join(Experiment.model_fields)}; a step's field: steps.<step>.<field>")
    data = merge(raw, overrides)
    steps = [dict(s) if isinstance(s, dict) else s for s in data.get("steps") or []]
    names = [s.get("name") for s in steps if isinstance(s, dict)]
    if not isinstance(step_overrides, dict):
        raise ConfigError("steps overrides must be given as steps.<step-name>.<field>=VALUE")
    for name, update in step_overrides.items():
        if name not in names:
            raise ConfigError(f"{where}: --set steps.{name}...: no step named {name!r}", hint=f"steps: {', '.join(names)}")
        i = names.index(name)
        steps[i] = merge(steps[i], update) if isinstance(update, dict) else update
    data["steps"] = steps
    for step in steps:
        renamed = _renamed(step) if isinstance(step, dict) else None
        if renamed:
            raise ConfigError(f"{where}: step {step.get('name')!r}: {renamed}", hint="renamed in 0.2 (CHANGELOG.md)")
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{where}: {validation_message(err)}",
                          hint="see docs/experiments.md for every step kind and its fields") from err
