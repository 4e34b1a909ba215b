"""Event log backends, chosen by name and imported only when chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import EventLog

if TYPE_CHECKING:
    from ..config import Settings

BACKENDS = ("sqlite", "memory", "redis")


def make_log(settings: Settings) -> EventLog:
    limits = {"max_events": settings.max_events or None, "default_ttl": settings.session_ttl or None,
              "lease_seconds": settings.lease or None, "cancel_grace": settings.cancel_grace or None}
    if settings.backend == "memory":
        from .memory import MemoryLog

        return MemoryLog(**limits)
    if settings.backend == "sqlite":
        from .sqlite import SqliteLog

        return SqliteLog(settings.db, synchronous=settings.sqlite_synchronous.upper(), **limits)
    if settings.backend == "redis":
        from .redis import RedisLog

        return RedisLog(settings.redis_url, wait_replicas=settings.redis_wait_replicas, **limits)
    raise ValueError(f"unknown backend {settings.backend!r}")


__all__ = ["EventLog", "make_log", "BACKENDS"]
