"""Gymnasium spaces for text environments: any text as the action, chat messages as the observation.

Gymnasium's own ``spaces.Text`` cannot serve here: its default charset is alphanumeric,
so a completion with a space, a newline or a ``$`` is "not in the action space", and
passing every Unicode code point as a charset would make ``contains`` and ``sample``
pointlessly slow. These two spaces contain exactly what a language model exchanges:

- ``AnyText``: any Python ``str`` up to ``max_length`` characters (the action);
- ``ChatMessages``: a list of ``{"role": ..., "content": str}`` dicts, the format every
  chat template takes (the observation). An empty list is allowed: it is the
  observation after the final step of an episode.

``sample()`` draws short strings that mix letters, digits, punctuation, whitespace,
newlines and non-ASCII characters, so ``check_env`` exercises a verifier with the kind
of garbage a model can really produce. Neither space can be flattened to a ``Box``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gymnasium import spaces

# What sample() draws from: printable ASCII, whitespace, and a few multi-byte characters.
_SAMPLE_CHARS = tuple(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    " \t\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
) + ("é", "ß", "中", "∑", "→", "😀")

ROLES = ("system", "user", "assistant", "tool")


class AnyText(spaces.Space[str]):
    """Any ``str`` of at most ``max_length`` characters (a model's completion)."""

    def __init__(self, max_length: int = 1_000_000, *, sample_length: int = 64, seed: Any = None):
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        self.max_length = max_length
        self.sample_length = min(sample_length, max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        """Draw a random string of up to ``sample_length`` characters (masks are not supported)."""
        if mask is not None or probability is not None:
            raise NotImplementedError("AnyText.sample does not support masks")
        length = int(self.np_random.integers(0, self.sample_length + 1))
        picks = self.np_random.integers(0, len(_SAMPLE_CHARS), size=length)
        return "".join(_SAMPLE_CHARS[int(i)] for i in picks)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"AnyText(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnyText) and other.max_length == self.max_length


class ChatMessages(spaces.Space[list]):
    """A list of chat messages ``[{"role": str, "content": str}, ...]``.

    ``role`` must be one of ``roles``; ``content`` any string up to ``max_length``
    characters. Extra string-valued keys (``name``, ``tool_call_id``) are allowed because
    chat templates accept them.
    """

    def __init__(
        self,
        max_messages: int = 1024,
        max_length: int = 1_000_000,
        *,
        roles: Sequence[str] = ROLES,
        seed: Any = None,
    ):
        self.max_messages = max_messages
        self.roles = tuple(roles)
        self._text = AnyText(max_length)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def seed(self, seed: int | None = None) -> Any:
        # The content sub-space shares the seed so that sample() is reproducible as a whole.
        result = super().seed(seed)
        self._text.seed(seed)
        return result

    def sample(self, mask: Any = None, probability: Any = None) -> list[dict[str, str]]:
        """Draw 0 to 3 messages with random roles and random content."""
        if mask is not None or probability is not None:
            raise NotImplementedError("ChatMessages.sample does not support masks")
        n = int(self.np_random.integers(0, min(3, self.max_messages) + 1))
        return [
            {
                "role": self.roles[int(self.np_random.integers(len(self.roles)))],
                "content": self._text.sample(),
            }
            for _ in range(n)
        ]

    def contains(self, x: Any) -> bool:
        if not isinstance(x, list) or len(x) > self.max_messages:
            return False
        return all(self._is_message(m) for m in x)

    def _is_message(self, m: Any) -> bool:
        return (
            isinstance(m, dict)
            and m.get("role") in self.roles
            and self._text.contains(m.get("content"))
            and all(isinstance(k, str) and isinstance(v, str) for k, v in m.items())
        )

    def __repr__(self) -> str:
        return f"ChatMessages(max_messages={self.max_messages}, roles={self.roles})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ChatMessages)
            and other.max_messages == self.max_messages
            and other.roles == self.roles
            and other._text == self._text
        )
