"""robot.ini -> RobotConfig: timing, safety limits and the servo table."""
from __future__ import annotations

import configparser
import dataclasses
import pathlib

import numpy as np

from subscribers.robot.kinematics import JOINTS

DEFAULT_INI = pathlib.Path(__file__).with_name("robot.ini")


class RobotConfigError(ValueError):
    """robot.ini is wrong; the text names the file, section and key."""


@dataclasses.dataclass(frozen=True)
class Joint:
    name: str
    channel: int
    min: float  # degrees, joint limits
    max: float
    neutral: float
    max_speed: float  # deg/s
    invert: bool
    offset: float  # servo degrees at joint angle 0

    def to_servo(self, joint_deg):
        return self.offset + (-joint_deg if self.invert else joint_deg)

    def from_servo(self, servo_deg):
        return (self.offset - servo_deg) if self.invert else (servo_deg - self.offset)


@dataclasses.dataclass(frozen=True)
class RobotConfig:
    control_hz: float = 50.0
    actuator_latency_s: float = 0.08
    smoothing_tau_s: float = 0.03
    watchdog_s: float = 0.5
    glide_s: float = 1.0
    buffer_s: float = 4.0
    upper_arm_to_torso: float = 0.55
    thigh_to_torso: float = 0.8
    joints: tuple[Joint, ...] = ()

    # Arrays in JOINTS order, for the vectorized safety filter.
    @property
    def lo(self) -> np.ndarray:
        return np.array([j.min for j in self.joints])

    @property
    def hi(self) -> np.ndarray:
        return np.array([j.max for j in self.joints])

    @property
    def neutral(self) -> np.ndarray:
        return np.array([j.neutral for j in self.joints])

    @property
    def max_speed(self) -> np.ndarray:
        return np.array([j.max_speed for j in self.joints])

    @property
    def channels(self) -> list[int]:
        return [j.channel for j in self.joints]

    def to_servo(self, angles) -> dict[int, float]:
        """Joint angles (JOINTS order) -> {channel: servo degrees}."""
        return {j.channel: float(j.to_servo(a)) for j, a in zip(self.joints, angles)}

    def replace(self, **kw) -> "RobotConfig":
        return dataclasses.replace(self, **kw)


_ROBOT_KEYS = {f.name: f.type for f in dataclasses.fields(RobotConfig) if f.name != "joints"}
_JOINT_KEYS = ("channel", "min", "max", "neutral", "max_speed", "invert", "offset")


def load_config(path=None) -> RobotConfig:
    path = pathlib.Path(path or DEFAULT_INI)
    cp = configparser.ConfigParser(inline_comment_prefixes=(";", "#"))
    try:
        with open(path) as f:
            cp.read_file(f)
    except (OSError, configparser.Error) as e:
        raise RobotConfigError(f"{path}: cannot read the robot config: {e}") from e
    if "robot" not in cp:
        raise RobotConfigError(f"{path}: missing section [robot]")
    robot = {}
    for key, value in cp["robot"].items():
        if key not in _ROBOT_KEYS:
            raise RobotConfigError(f"{path} [robot]: unknown key {key!r}; known keys are {sorted(_ROBOT_KEYS)}")
        try:
            robot[key] = float(value)
        except ValueError as e:
            raise RobotConfigError(f"{path} [robot] {key} = {value!r}: must be a number") from e
    joints = {}
    for section in cp.sections():
        if section == "robot":
            continue
        if not section.startswith("joint."):
            raise RobotConfigError(f"{path}: unknown section [{section}]; use [robot] and [joint.<name>]")
        name = section[len("joint."):]
        if name not in JOINTS:
            raise RobotConfigError(f"{path} [{section}]: unknown joint {name!r}; joints are {JOINTS}")
        s = cp[section]
        unknown = sorted(set(s) - set(_JOINT_KEYS))
        missing = [k for k in _JOINT_KEYS if k not in s]
        if unknown or missing:
            raise RobotConfigError(f"{path} [{section}]: unknown keys {unknown}, missing keys {missing}")
        try:
            j = Joint(name=name, channel=s.getint("channel"), min=s.getfloat("min"), max=s.getfloat("max"),
                      neutral=s.getfloat("neutral"), max_speed=s.getfloat("max_speed"),
                      invert=s.getboolean("invert"), offset=s.getfloat("offset"))
        except ValueError as e:
            raise RobotConfigError(f"{path} [{section}]: {e}") from e
        joints[name] = j
    missing = [n for n in JOINTS if n not in joints]
    if missing:
        raise RobotConfigError(f"{path}: no [joint.<name>] section for {missing}")
    cfg = RobotConfig(**robot, joints=tuple(joints[n] for n in JOINTS))
    check(cfg, str(path))
    return cfg


def check(cfg: RobotConfig, where: str = "robot config"):
    """Reject a configuration that could drive a servo out of range or miss the watchdog time."""
    if not (1 <= cfg.control_hz <= 1000):
        raise RobotConfigError(f"{where}: control_hz = {cfg.control_hz} outside [1, 1000]")
    for key in ("actuator_latency_s", "smoothing_tau_s", "watchdog_s", "glide_s", "buffer_s"):
        if not getattr(cfg, key) >= 0:
            raise RobotConfigError(f"{where}: {key} must be >= 0")
    channels = [j.channel for j in cfg.joints]
    if len(set(channels)) != len(channels):
        raise RobotConfigError(f"{where}: two joints share a channel: {channels}")
    for j in cfg.joints:
        sec = f"{where} [joint.{j.name}]"
        if not (0 <= j.channel <= 15):
            raise RobotConfigError(f"{sec}: channel {j.channel} outside 0-15")
        if not (j.min < j.max and j.min <= j.neutral <= j.max):
            raise RobotConfigError(f"{sec}: need min < max and neutral within them (min {j.min}, neutral {j.neutral}, max {j.max})")
        if j.max_speed <= 0:
            raise RobotConfigError(f"{sec}: max_speed must be > 0 deg/s")
        lo, hi = sorted((j.to_servo(j.min), j.to_servo(j.max)))
        if lo < 0 or hi > 180:
            raise RobotConfigError(f"{sec}: joint range [{j.min}, {j.max}] maps to servo [{lo}, {hi}], outside 0-180; "
                                   "adjust offset or the limits")
        if cfg.glide_s > 0 and (j.max - j.min) / cfg.glide_s > j.max_speed:
            raise RobotConfigError(f"{sec}: gliding the full range in glide_s = {cfg.glide_s} s needs "
                                   f"{(j.max - j.min) / cfg.glide_s:.0f} deg/s > max_speed {j.max_speed}; "
                                   "raise glide_s or max_speed")
