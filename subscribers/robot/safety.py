"""What stands between a pose stream and a servo: limits, smoothing, rate limits, watchdog.

Every command passes `SafetyFilter.step`, in this order:
1. clamp the target to the joint limits (a target outside them is never approached);
2. one-pole smoothing toward it, alpha = 1 - exp(-dt / tau) (lag ~ tau for slow motion);
3. rate limit: at most max_speed * dt degrees per step;
4. clamp again (the output is always inside the limits, whatever came before).

`Watchdog`: no valid frame for `watchdog_s` -> a linear glide from wherever the joints
are to neutral over `glide_s`; the glide also passes the filter (config.check makes sure
no speed limit can slow it down).
"""
from __future__ import annotations

import math

import numpy as np


class SafetyFilter:
    def __init__(self, lo, hi, max_speed, tau_s: float, start):
        self.lo, self.hi = np.asarray(lo, float), np.asarray(hi, float)
        self.max_speed = np.asarray(max_speed, float)
        self.tau_s = tau_s
        self.start = np.clip(np.asarray(start, float), self.lo, self.hi)
        self.reset()

    def reset(self, angles=None):
        self.state = self.start.copy() if angles is None else np.clip(np.asarray(angles, float), self.lo, self.hi)
        self.smoothed = self.state.copy()

    def step(self, target, dt: float, smooth: bool = True) -> np.ndarray:
        target = np.clip(np.asarray(target, float), self.lo, self.hi)
        dt = max(dt, 0.0)
        if smooth and self.tau_s > 0:
            alpha = 1.0 - math.exp(-dt / self.tau_s)
            self.smoothed = self.smoothed + alpha * (target - self.smoothed)
        else:
            self.smoothed = target
        max_step = self.max_speed * dt
        self.state = np.clip(self.state + np.clip(self.smoothed - self.state, -max_step, max_step), self.lo, self.hi)
        return self.state.copy()


class Watchdog:
    """Tracks the last valid frame; after `watchdog_s` without one, plans a glide to neutral."""

    def __init__(self, watchdog_s: float, glide_s: float, neutral):
        self.watchdog_s, self.glide_s = watchdog_s, glide_s
        self.neutral = np.asarray(neutral, float)
        self.last_valid: float | None = None
        self.tripped_at: float | None = None
        self._from = None
        self.trips = 0

    def feed(self, now: float):
        self.last_valid = now
        self.tripped_at = None

    def trip(self, now: float):
        """Go to neutral now (e.g. the device said it is offline)."""
        self.last_valid = now - self.watchdog_s

    def expired(self, now: float) -> bool:
        return self.last_valid is None or now - self.last_valid >= self.watchdog_s

    def glide_target(self, now: float, current) -> np.ndarray:
        """The glide's set point at `now` (call only when expired)."""
        if self.tripped_at is None:
            self.tripped_at, self._from = now, np.asarray(current, float).copy()
            self.trips += self.last_valid is not None  # not counted: waiting for the first frame
        if self.glide_s <= 0:
            return self.neutral.copy()
        f = min(1.0, (now - self.tripped_at) / self.glide_s)
        return self._from + f * (self.neutral - self._from)
