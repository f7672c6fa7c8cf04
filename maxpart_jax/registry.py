"""Named registries: models, search operators and algorithms, defenses, datasets, integer
block types. One mechanism and one error style for all of them.

A :class:`Registry` maps names to entries, reads like a ``dict`` (``sorted(reg)``,
``name in reg``, ``reg[name]``), refuses a name twice and, through ``check``, an entry that
misses what its kind needs, at registration, by name::

  OPERATORS = Registry("mutate operator")

  @OPERATORS.register("flip")
  def flip(key, genome, space): ...

  OPERATORS.get("flop")  # ValueError: unknown mutate operator 'flop'; registered: ['flip']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")
_REQUIRED = object()


class Registry(Mapping[str, T], Generic[T]):
  """Entries of one kind by name.

  Args:
    kind: what an entry is, as error messages name it ("model", "defense", ...).
    check: called as ``check(name, entry)`` at registration; raises ``ValueError`` naming
      what the entry lacks.
    aliases: other names that :meth:`get` accepts for a registered name.
  """

  def __init__(self, kind: str, check: Callable[[str, T], None] | None = None,
               aliases: Mapping[str, str] | None = None):
    self.kind = kind
    self._check = check
    self._entries: dict[str, T] = {}
    self.aliases = dict(aliases or {})

  @overload
  def register(self, name: str) -> Callable[[T], T]: ...

  @overload
  def register(self, name: str, entry: T) -> T: ...

  def register(self, name: str, entry: Any = None) -> Any:
    """Adds ``entry`` as ``name`` and returns it; without ``entry``, a decorator that does."""
    if entry is None:
      return lambda e: self.register(name, e)
    if not isinstance(name, str) or not name:
      raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
    if name in self._entries or name in self.aliases:
      raise ValueError(f"a {self.kind} named {name!r} is already registered")
    if self._check is not None:
      self._check(name, entry)
    self._entries[name] = entry
    return entry

  def unregister(self, name: str, missing_ok: bool = False) -> T | None:
    """Removes ``name`` (a test's or a notebook cell's entry, to register it again) and
    returns its entry; an unknown name is a ``ValueError`` unless ``missing_ok``."""
    if name not in self._entries:
      if missing_ok:
        return None
      raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
    return self._entries.pop(name)

  def get(self, name: str, default: Any = _REQUIRED) -> Any:
    """The entry registered as ``name`` (or an alias of it); for an unknown name, ``default``
    if one is given (as ``dict.get``), else a ``ValueError`` listing every registered name."""
    key = self.aliases.get(name, name)
    if key in self._entries:
      return self._entries[key]
    if default is not _REQUIRED:
      return default
    raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")

  def names(self) -> list[str]:
    """Every name :meth:`get` accepts, aliases included, sorted."""
    return sorted([*self._entries, *self.aliases])

  def __getitem__(self, name: str) -> T:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def __repr__(self) -> str:
    return f"Registry({self.kind!r}: {sorted(self._entries)})"
