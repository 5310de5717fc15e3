"""SSAH attribution end to end: score safety and utility data, classify units, save the map and its plots.

Why one function: the `attribute` command and the demo's units stage did these steps each in their own way
(different settings recorded, different data defaults); both now call `attribute`.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safeunits.config import Config
from safeunits.data.records import Record
from safeunits.data.registry import load_dataset
from safeunits.distributed import is_main_process
from safeunits.units.classes import ClassifyConfig, build_unit_map
from safeunits.units.scores import ScoreConfig, compute_scores
from safeunits.units.unit_map import UnitMap

log = logging.getLogger(__name__)

MAP_FILE = "unit_map.safetensors"


class AttributionConfig(Config):
    """What a unit map is computed from: the two data sets, how many examples, the score and the class fractions."""

    safety_data: str = Field("advbench-refusals", description="harmful prompts paired with refusals (dataset name or file)")
    utility_data: str = Field("self-instruct:seed", description="benign instructions with answers (dataset name or "
                              "file); not self-instruct:user, which the evaluation's utility NLL scores")
    limit: int = Field(128, ge=1, description="examples taken from each dataset")
    sample_seed: int | None = Field(0, description="take a seeded random sample of `limit` rows, as Wei et al.'s "
                                    "attribution code does (advbench-refusals' first 128 rows hold only 53 distinct "
                                    "prompts); None: the first `limit` rows")
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    plots: bool = Field(True, description="also write class_shares.png and unit_map.png")

    @classmethod
    def of_map(cls, unit_map: UnitMap) -> AttributionConfig:
        """The settings `unit_map` was computed with, so that a map of another model is comparable to it (role
        transfer); a setting the map does not record keeps its default."""
        recorded = unit_map.settings
        fields = {"safety_data": "safety", "utility_data": "utility", "limit": "limit", "sample_seed": "sample_seed",
                  "score": "score", "classify": "fractions"}
        return cls.model_validate({field: recorded[key] for field, key in fields.items() if key in recorded})


def _take(records: list[Record], n: int, seed: int | None) -> list[Record]:
    """The first n records, or a seeded random sample of n (in dataset order, so batches stay comparable)."""
    if seed is None or n >= len(records):
        return records[:n]
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


def attribute(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: AttributionConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> UnitMap:
    """Score every MLP channel and head on the safety and the utility data, classify them (SCU/UCU/CU/RU), and
    save `unit_map.safetensors` + `unit_map.json` (+ plots) into `out_dir` when given."""
    config = config or AttributionConfig()
    data = {kind: (spec, _take(load_dataset(spec, data_dir=data_dir), config.limit, config.sample_seed))
            for kind, spec in (("safety", config.safety_data), ("utility", config.utility_data))}  # a typo fails first
    scores = {}
    for kind, (spec, records) in data.items():
        log.info("scoring units on %d %s examples (%s)", len(records), kind, spec)
        scores[kind] = compute_scores(model, tokenizer, records, config.score, progress=progress, desc=f"{kind} data")
        scores[kind].extra = {"dataset": spec, "seconds": scores[kind].seconds}
    unit_map = build_unit_map(model, scores["safety"], scores["utility"], config.classify,
                              settings={"model": model_name, "safety": config.safety_data, "utility": config.utility_data,
                                        "limit": config.limit, "sample_seed": config.sample_seed,
                                        "score": config.score.model_dump()})
    if out_dir is not None and is_main_process():  # under a launcher every process scored its share; one writes
        out = Path(out_dir)
        unit_map.save(out / MAP_FILE)
        if config.plots:
            from safeunits.units.plots import write_map_plots

            write_map_plots(unit_map, out)
    return unit_map
