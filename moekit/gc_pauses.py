"""Process-wide settings that loads change while they run: the cyclic garbage collector
(off) and the GIL switch interval (shorter), each restored when the last of the calls that
changed it, in any thread, ends."""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
V = TypeVar("V")


class ScopedSetting(Generic[V]):
    """A process-wide setting changed while at least one caller is inside ``scope()``.

    The first caller to enter saves the setting and changes it; the last to leave puts
    the saved value back. Calls from several threads at once, or nested ones, therefore
    never leave the setting changed, nor restore it while another call still needs it."""

    def __init__(self, get: Callable[[], V], put: Callable[[V], object],
                 changed: Callable[[V], V]) -> None:
        """``get`` reads the setting, ``put`` sets it, ``changed(saved)`` is the value
        used while callers are inside."""
        self._get, self._put, self._changed = get, put, changed
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: V | None = None

    @contextmanager
    def scope(self) -> Iterator[None]:
        """The setting changed for the duration (see the class)."""
        with self._lock:
            if self._inside == 0:
                self._saved = self._get()
                self._put(self._changed(self._saved))
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._put(self._saved)


def _set_collector(enabled: bool) -> None:
    if enabled:
        gc.enable()
    else:
        gc.disable()


COLLECTOR_OFF = ScopedSetting(gc.isenabled, _set_collector, lambda saved: False)
"""The cyclic garbage collector, off while a load or a plan is made.

Planning a load makes tens of thousands of small objects (header entries, reads,
recipes), and that many allocations set off full collections, each of which walks every
object the process holds: with torch imported, such a pause takes about 0.1 s, in the
middle of a load of 0.3 s. What a load makes holds no cycles that need
collecting meanwhile, and reference counting frees it as usual."""


def without_gc_pauses(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run with the cyclic garbage collector off (``COLLECTOR_OFF``)."""

    @functools.wraps(fn)
    def quiet(*args: P.args, **kwargs: P.kwargs) -> R:
        with COLLECTOR_OFF.scope():
            return fn(*args, **kwargs)

    return quiet
