"""What a build is told to ignore in the cache: ``--no-cache``, ``--no-cache-from N``,
``--refresh``.

A setup step's key names its inputs (the command, the parent step), not its output: an unpinned
``pip install`` under the same key can give newer packages on a later day. ``--no-cache``
rebuilds every setup step, ``--no-cache-from N`` setup step N (1-based, as progress numbers
them) and every one after it; the steps before N are reused. A rebuilt step replaces the record
and root filesystem cached under its key (the next build of the same key reuses the new result).
``--refresh`` asks the registry which digest the image's tag names instead of reusing a recent
answer (``microagent.lock`` pins are never refreshed: ``lock --update`` does that).
"""

from __future__ import annotations

from dataclasses import dataclass

from microagent.errors import UsageError
from microagent.frozen import Frozen


@dataclass(frozen=True, eq=False, repr=False)
class CacheControl(Frozen):
    no_cache: bool = False
    no_cache_from: int | None = None  # 1-based setup step
    refresh: bool = False

    def __post_init__(self) -> None:
        if self.no_cache and self.no_cache_from is not None:
            raise UsageError(
                "--no-cache and --no-cache-from are exclusive",
                hint="--no-cache rebuilds every setup step; --no-cache-from N from step N on",
            )
        if self.no_cache_from is not None and self.no_cache_from < 1:
            raise UsageError(
                f"--no-cache-from {self.no_cache_from}: setup steps are numbered from 1",
                hint="--no-cache-from 1 (or --no-cache) rebuilds every setup step",
            )

    @property
    def flag(self) -> str:
        """The option as typed, for messages (empty when nothing is forced)."""
        if self.no_cache_from is not None:
            return f"--no-cache-from {self.no_cache_from}"
        return "--no-cache" if self.no_cache else ""

    def rebuild_from(self, setup_steps: int) -> int | None:
        """The first setup step (1-based) to rebuild even if cached, or None for none.

        Raises :class:`UsageError` when ``--no-cache-from N`` names a step the spec lacks.
        """
        if self.no_cache_from is not None:
            if self.no_cache_from > setup_steps:
                raise UsageError(
                    f"--no-cache-from {self.no_cache_from}: the spec has "
                    f"{setup_steps} setup step{'' if setup_steps == 1 else 's'}",
                    hint=f"give a step from 1 to {setup_steps}, as `plan` numbers them"
                    if setup_steps
                    else "there is no setup step to rebuild",
                )
            return self.no_cache_from
        return 1 if self.no_cache and setup_steps else None
