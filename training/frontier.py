"""A sweep's Pareto frontier of a metric against L0, read at chosen L0 values (what a comparison of sweeps tabulates).

The frontier (`training.evaluate.pareto_front`): the members no other member beats, i.e. none has an L0 at most
theirs and a value at least theirs with one of the two strict. Sorted by L0, its values rise strictly with L0, so
reading it at an L0 between two of its members is a monotone interpolation.
"""

from __future__ import annotations

import math
from typing import Sequence

from training.evaluate import pareto_front

TARGET_L0 = (16, 32, 64)
"""The L0 values a comparison reads every frontier at."""


def frontier_points(l0: Sequence[float], values: Sequence[float]) -> list[tuple[float, float]]:
    """(L0, value) of the Pareto frontier's members with L0 > 0 (a log axis cannot hold 0), by increasing L0."""
    usable = [i for i in range(len(l0)) if math.isfinite(l0[i]) and l0[i] > 0 and math.isfinite(values[i])]
    front = pareto_front([l0[i] for i in usable], [values[i] for i in usable])
    return [(float(l0[usable[j]]), float(values[usable[j]])) for j in front]


def value_at_l0(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The frontier `points` ((L0, value) by increasing L0) read at L0 = `target`: linear in log L0 between the
    two members bracketing it, v = v_a + (v_b - v_a) * (ln target - ln L0_a) / (ln L0_b - ln L0_a); a member's own
    value at its L0; None outside [smallest L0, largest L0] of the frontier (never extrapolated)."""
    if not points or not target > 0:
        return None
    for l0, v in points:
        if l0 == target:
            return v
    for (l0_a, v_a), (l0_b, v_b) in zip(points, points[1:]):
        if l0_a < target < l0_b:
            t = (math.log(target) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return v_a + (v_b - v_a) * t
    return None


def values_at_l0(l0: Sequence[float], values: Sequence[float], targets: Sequence[float] = TARGET_L0
                 ) -> list[float | None]:
    """One sweep's frontier of `values` against `l0` read at each of `targets` (None where outside its range)."""
    points = frontier_points(l0, values)
    return [value_at_l0(points, t) for t in targets]
