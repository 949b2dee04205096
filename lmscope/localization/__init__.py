"""Locating what drives a prediction: direct logit attribution, patching and relatives."""

from lmscope.localization.dla import dla

__all__ = ["dla"]
