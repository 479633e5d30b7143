"""The recipes of ``kdfast train``: each module has ``run(Options) -> report dict``."""

RECIPES = {
    "slotmatch": "kdfast.train.recipes.slotmatch",
    "wecolora": "kdfast.train.recipes.wecolora",
    "gini": "kdfast.train.recipes.gini",
}
