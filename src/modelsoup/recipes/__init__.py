"""Recipes: one file each. A recipe turns ingredients (and a taster) into a :class:`Soup`."""

from modelsoup.recipes.uniform import average

__all__ = ["average"]
