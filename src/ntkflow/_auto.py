"""The ``auto`` solver choice."""

from __future__ import annotations

from typing import ClassVar

from ntkflow._solvers import Tsit5


class Auto(Tsit5):
    """Chooses a method from the problem (currently: Tsitouras 5(4))."""

    name: ClassVar[str] = "auto"
