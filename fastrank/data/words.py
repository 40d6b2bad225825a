"""The word splitting and plural stem every text note shares (features, goal roles): one definition, so
"cellphones" in a goal and "cellphone 1" in an action match the same way everywhere."""
from __future__ import annotations

import re

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric runs: 'Put 2 CDs in/on desk 1.' -> ['put', '2', 'cds', 'in', 'on', 'desk', '1']."""
    return WORD.findall(text.lower())


def stem(w: str) -> str:
    """Drop one plural 's' from words longer than three letters ('cellphones' -> 'cellphone', 'gas' stays)."""
    return w[:-1] if len(w) > 3 and w.endswith("s") else w
