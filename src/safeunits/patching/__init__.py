"""SafePatching (SPEC §5): harmful data, safety / over-safety patches, saliency, controllable merge, sparse
patch files, streamed apply, sweep, continual alignment and baselines. See docs/patching.md."""

from safeunits.patching.apply import apply_patch, apply_patch_to_checkpoint, undo_patch
from safeunits.patching.harmful_data import HarmfulDataConfig, OverlapError, build_harmful_data, load_harmful_data
from safeunits.patching.merge import MergeConfig, controllable_merge
from safeunits.patching.patches import DensePatch, PatchConfig, derive_patch
from safeunits.patching.sparse import PatchMismatchError, SparsePatch

__all__ = ["apply_patch", "apply_patch_to_checkpoint", "undo_patch", "HarmfulDataConfig", "OverlapError",
           "build_harmful_data", "load_harmful_data", "MergeConfig", "controllable_merge", "DensePatch", "PatchConfig",
           "derive_patch", "PatchMismatchError", "SparsePatch"]
