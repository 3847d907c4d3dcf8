"""What the hostile-file generators share: their cases are named "<class>/<what>", and a run takes a seeded sample."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol, TypeVar


class NamedCase(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def fine(self) -> bool: ...


C = TypeVar("C", bound=NamedCase)


def class_of(case: NamedCase) -> str:
    return case.name.split("/", 1)[0]


def unique(cases: Sequence[C]) -> tuple[C, ...]:
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return tuple(cases)


def sample(cases: Sequence[C], classes: Sequence[str], seed: int, per_class: int) -> list[C]:
    """`per_class` cases of each class, chosen by `seed`, always including a fine one where the class has some."""
    rng = random.Random(seed)
    chosen: list[C] = []
    for klass in classes:
        members = [case for case in cases if class_of(case) == klass]
        fine = [case for case in members if case.fine]
        picked = rng.sample(fine, 1) if fine else []
        rest = [case for case in members if case not in picked]
        chosen += picked + rng.sample(rest, min(per_class - len(picked), len(rest)))
    return chosen
