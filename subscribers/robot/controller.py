"""The robot's brain, without MQTT or threads: frames in, joint commands out (clock injected).

Beat lead. A frame describes the music up to `t_audio`, captured at wall-clock time
`t_capture` (the device's clock; the robot's must agree, NTP on a LAN is a few ms, and a
robot on the device itself is exact). So audio time a played at wall time a + offset,
offset = t_capture - t_audio. A servo needs `actuator_latency_s` (+ the smoothing lag) to
get where it is sent; to land a move on the music, the command sent at wall time `now`
must be the pose for audio time

    a* = now + lead - offset,  lead = actuator_latency_s + smoothing_tau_s,

which lies beyond the newest frame (by the device's and the network's latency plus the
lead). Dance repeats with the beat, so the robot plays the pose from the same place in an
earlier beat: a whole number of beat periods back (P = 60 / bpm), then corrected with
`next_beat_in` so the source frame's distance to its next beat equals a*'s distance to
the beat the tracker predicts (b = t_audio + next_beat_in of the newest frame). A move
the stream puts on beat n is thus commanded `lead` before beat n + k and lands on it.
`offset` is the median over the last 2 s. Without a tempo (bpm 0) the newest pose is held.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math

import numpy as np

from subscribers.robot.config import RobotConfig
from subscribers.robot.kinematics import joint_angles
from subscribers.robot.safety import SafetyFilter, Watchdog

log = logging.getLogger(__name__)
OFFSET_WINDOW_S = 2.0


class Controller:
    def __init__(self, cfg: RobotConfig):
        self.cfg = cfg
        self.lead_s = cfg.actuator_latency_s + cfg.smoothing_tau_s
        self.filter = SafetyFilter(cfg.lo, cfg.hi, cfg.max_speed, cfg.smoothing_tau_s, start=cfg.neutral)
        self.watchdog = Watchdog(cfg.watchdog_s, cfg.glide_s, cfg.neutral)
        self.reset()

    def reset(self):
        self.times: list[float] = []  # t_audio of each kept frame, increasing
        self.angles: list[np.ndarray] = []  # (12,) per frame
        self.next_beat: list[float] = []  # next_beat_in per frame
        self.bpm = 0.0
        self._offsets: collections.deque = collections.deque()  # (now, t_capture - t_audio)
        self.lag_s = 0.0  # now - t_capture of the newest frame: the device's + the network's latency
        self._last_tick: float | None = None
        self.frames = 0
        self.filter.reset()

    # --- input --------------------------------------------------------------

    def on_frame(self, msg: dict, now: float):
        """A decoded, in-order pose message (device.protocol.decode + SequenceGuard)."""
        t = float(msg["t_audio"])
        if self.times and t <= self.times[-1]:
            log.info("audio time went back from %.3f to %.3f s: a new stream, history cleared", self.times[-1], t)
            self.times.clear(), self.angles.clear(), self.next_beat.clear(), self._offsets.clear()
        a = joint_angles(np.asarray(msg["kp"], float), self.cfg.upper_arm_to_torso, self.cfg.thigh_to_torso)
        self.times.append(t)
        self.angles.append(a)
        self.next_beat.append(float(msg["beat"]["next_beat_in"]))
        self.bpm = float(msg["beat"]["bpm"])
        while self.times[0] < t - self.cfg.buffer_s:
            del self.times[0], self.angles[0], self.next_beat[0]
        self._offsets.append((now, float(msg["t_capture"]) - t))
        while self._offsets[0][0] < now - OFFSET_WINDOW_S:
            self._offsets.popleft()
        self.lag_s = now - float(msg["t_capture"])
        self.watchdog.feed(now)
        self.frames += 1

    def on_status(self, msg: dict, now: float):
        if msg.get("state") in ("offline", "stopped", "paused"):
            log.info("device %s is %s: going to neutral", msg.get("device"), msg["state"])
            self.watchdog.trip(now)

    # --- scheduling ---------------------------------------------------------

    @property
    def offset_s(self) -> float:
        return float(np.median([o for _, o in self._offsets])) if self._offsets else 0.0

    def source_time(self, now: float) -> float | None:
        """The audio time whose pose to command at wall time `now` (None: no frames yet)."""
        if not self.times:
            return None
        newest = self.times[-1]
        target = now + self.lead_s - self.offset_s
        if target <= newest:
            return max(target, self.times[0])
        if self.bpm <= 0:
            return newest
        period = 60.0 / self.bpm
        src = target - math.ceil((target - newest) / period) * period
        # Phase correction: the source's time to its next beat should equal the target's.
        beat_ahead = (newest + self.next_beat[-1] - target) % period
        i = max(0, bisect.bisect_right(self.times, src) - 1)
        src_ahead = self.next_beat[i] - (src - self.times[i])
        src += (src_ahead - beat_ahead + period / 2) % period - period / 2
        if src > newest:
            src -= period
        return src if src >= self.times[0] else newest

    def pose_at(self, t: float) -> np.ndarray:
        """Joint angles at audio time t, linear between frames."""
        i = bisect.bisect_right(self.times, t)
        if i == 0:
            return self.angles[0]
        if i == len(self.times):
            return self.angles[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        f = (t - t0) / (t1 - t0)
        return (1 - f) * self.angles[i - 1] + f * self.angles[i]

    # --- output -------------------------------------------------------------

    def tick(self, now: float) -> np.ndarray:
        """The joint angles (12,) to command at `now`: scheduled, then filtered."""
        dt = 1.0 / self.cfg.control_hz if self._last_tick is None else now - self._last_tick
        self._last_tick = now
        if self.watchdog.expired(now) or not self.times:
            target = self.watchdog.glide_target(now, self.filter.state)
            out = self.filter.step(target, dt, smooth=False)
            return out
        return self.filter.step(self.pose_at(self.source_time(now)), dt)
