"""Editable in the fake project: a constant the score depends on."""

BONUS = 0.0
