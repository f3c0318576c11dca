"""Selecting parameters by name: one semantics for every method of the plugin.

Every option that picks parameters by name (ACE's ``exclude_keys``, ``average_keys`` and
``spectrum_keys``, NAN's ``remove_keys``) is a list of Python regular expressions matched with
``re.match``: a pattern selects a name when it matches at the *start* of the name, as the
authors' lists are written (``".*score.*"``, ``".*classifier.*"``). So

- ``".*bias.*"`` selects every name containing ``bias``;
- ``"h.0.attn.c_attn.weight"`` (an exact name) selects that name, and any other name the regex
  matches at its start; escape the dots and anchor the end
  (``r"h\\.0\\.attn\\.c_attn\\.weight$"``) to select exactly one;
- an exact name always selects itself, even when it holds regex characters (``[``, ``+``) that
  would not match it as a pattern.

An invalid regex is a ``ValueError`` naming the option, raised when the method is configured.
Standard library only (no torch, no FusionBench).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple, Union

__all__ = ["NamePatterns"]


@dataclass(frozen=True)
class NamePatterns:
    """The compiled patterns of one option (``what`` names the option in errors and logs)."""

    what: str
    patterns: Tuple[str, ...]
    compiled: Tuple["re.Pattern[str]", ...]

    @classmethod
    def compile(
        cls, patterns: Union["NamePatterns", Sequence[str], None], what: str
    ) -> "NamePatterns":
        """Compile ``patterns`` once (already compiled ones are returned as they are); an invalid
        one raises ``ValueError`` naming ``what``."""
        if isinstance(patterns, NamePatterns):
            return patterns
        texts = tuple(patterns or ())
        compiled = []
        for pattern in texts:
            if not isinstance(pattern, str):
                raise ValueError(f"{what} holds {pattern!r}: expected regex strings")
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise ValueError(f"invalid {what} regex {pattern!r}: {error}") from None
        return cls(what, texts, tuple(compiled))

    def matches(self, name: str) -> bool:
        """Whether any pattern selects ``name`` (``re.match``, or the name itself)."""
        return any(
            _selects(text, pattern, name) for text, pattern in zip(self.patterns, self.compiled)
        )

    def select(self, names: Iterable[str]) -> List[str]:
        """The ``names`` selected, in their order."""
        return [name for name in names if self.matches(name)]

    def unused(self, names: Iterable[str]) -> List[str]:
        """The patterns that select none of ``names`` (worth a warning: a typo selects nothing)."""
        names = list(names)
        return [
            text
            for text, pattern in zip(self.patterns, self.compiled)
            if not any(_selects(text, pattern, name) for name in names)
        ]


def _selects(text: str, pattern: "re.Pattern[str]", name: str) -> bool:
    return text == name or pattern.match(name) is not None
