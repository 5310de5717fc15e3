"""Training recipes: `align` (safety SFT, optionally only on a unit budget), `finetune` (with frozen units), `attack`.

A recipe is a pydantic config (loadable from YAML, see `safeunits/configs/recipes/`) that says which model,
which data mix, which units train or stay frozen, and the `TrainConfig`. `run_recipe` does the whole run:
build the data, build the masks, train, save the model folder and a report (recipe, data manifest, mask
shares, losses) into the run directory, and optionally evaluate the three axes.

Three modules, in the order of the data flow: `schema` (the configs and their YAML loader), `data` (the examples a
recipe trains on), `run` (masks, training, the run folder). Their public names are here.
"""

from safeunits.train.recipes.data import (align_data, answer_missing, attack_data, data_manifest, finetune_data, fits,
                                          harmful_pool)
from safeunits.train.recipes.run import RecipeReport, recipe_masks, run_recipe, train_recipe
from safeunits.train.recipes.schema import (RECIPE_DIR, AlignRecipe, AttackRecipe, FinetuneRecipe, Recipe,
                                            load_recipe)

__all__ = ["RECIPE_DIR", "AlignRecipe", "AttackRecipe", "FinetuneRecipe", "Recipe", "RecipeReport", "load_recipe", "align_data",
           "answer_missing", "attack_data", "data_manifest", "finetune_data", "fits", "harmful_pool", "recipe_masks",
           "run_recipe", "train_recipe"]
