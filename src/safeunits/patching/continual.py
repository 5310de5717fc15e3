"""Continual post-safety alignment: one SafePatching step per harm category, applied in sequence.

Each step builds D_h for its category on the *current* model, derives δ_SE and δ_OSM from it, merges them, adds
the sparse patch to the model and evaluates the three axes. This module holds the study's settings; the study
itself is an experiment (`safeunits.experiments.presets.continual`: harmful-data, derive, merge, apply and evaluate
steps per category), so it is cached and resumed by the experiment runner like any other. The per-step patches
are saved (`step<k>_<category>-merge/patch`), so the final model is also the backbone plus their ordered sum
(`safeunits patch apply --patch ... --patch ...`).
"""

from __future__ import annotations

from pydantic import Field

from safeunits.config import Config
from safeunits.patching.harmful_data import HarmfulDataConfig
from safeunits.patching.merge import MergeConfig
from safeunits.patching.patches import PatchConfig


class ContinualConfig(Config):
    """Categories in order, and how each step's data, patches and merge are made."""

    prompts: str = Field("donotanswer", description="dataset whose categories are the steps")
    categories: list[str] = Field(["malicious_uses", "information_hazard",
                                   "discrimination_exclusion_toxicity_hateful_offensive"],
                                  description="harm categories, one patching step each, in this order")
    harmful_data: HarmfulDataConfig = Field(default_factory=lambda: HarmfulDataConfig(
        prompts="donotanswer", offset=0, n_train=24, n_val=0, responses="prefill"))
    se: PatchConfig = Field(default_factory=lambda: PatchConfig(objective="ascent"))
    osm: PatchConfig = Field(default_factory=lambda: PatchConfig(objective="descent"))
    merge: MergeConfig = Field(default_factory=MergeConfig)
