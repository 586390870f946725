"""Servo buses. Each takes {channel: servo degrees (0-180)} per control tick.

- `SimulatedBus`: records (t, channel, degrees); `plot(path)` draws the traces.
- `ServoKitBus`: a PCA9685 over I2C through Adafruit ServoKit (optional import).
- `SerialBus`: an Arduino-class board on a serial line, one text line per servo:

      S<channel>:<degrees>\\n      e.g. "S3:92.5\\n"  (channel 0-15, degrees 0.0-180.0, one decimal)

  sent for every channel each tick; the board answers nothing. A matching Arduino sketch
  is a `Serial.readStringUntil('\\n')`, a parse and `servo[ch].write(deg)`; docs/robot.md.

All are context managers; `write` never receives a value outside 0-180 (the controller's
limits come first, the bus clamps once more).
"""
from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

log = logging.getLogger(__name__)
SERVO_MIN, SERVO_MAX = 0.0, 180.0


class BusError(RuntimeError):
    """The servo hardware or its library is missing; the text says what to install or check."""


def _clamp(deg: float) -> float:
    return min(SERVO_MAX, max(SERVO_MIN, float(deg)))


class Bus:
    def write(self, commands: dict[int, float], t: float):
        raise NotImplementedError

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SimulatedBus(Bus):
    """Records every command; the robot you can run in CI."""

    def __init__(self, names: dict[int, str] | None = None):
        self.names = names or {}
        self.trace: list[tuple[float, int, float]] = []

    def write(self, commands, t):
        self.trace.extend((t, ch, _clamp(deg)) for ch, deg in commands.items())

    def series(self, channel: int) -> tuple[np.ndarray, np.ndarray]:
        """(times, degrees) of one channel."""
        rows = [(t, d) for t, ch, d in self.trace if ch == channel]
        if not rows:
            return np.zeros(0), np.zeros(0)
        t, d = zip(*rows)
        return np.array(t), np.array(d)

    def plot(self, path, channels=None, beats=(), t0: float | None = None, title: str = "servo commands",
             marks: dict | None = None):
        """A PNG of the traces; `beats` (same clock) as vertical lines, `marks` {label: time}."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        channels = sorted({ch for _, ch, _ in self.trace}) if channels is None else list(channels)
        if not channels:
            raise ValueError("SimulatedBus.plot: nothing was recorded")
        t0 = min(t for t, _, _ in self.trace) if t0 is None else t0
        fig, axes = plt.subplots(len(channels), 1, figsize=(10, 1.2 + 1.1 * len(channels)), sharex=True,
                                 squeeze=False)
        for ax, ch in zip(axes[:, 0], channels):
            t, d = self.series(ch)
            ax.plot(t - t0, d, lw=1.2)
            for b in beats:
                ax.axvline(b - t0, color="tab:red", lw=0.6, alpha=0.5)
            for label, tm in (marks or {}).items():
                ax.axvline(tm - t0, color="k", ls="--", lw=0.8)
            ax.set_ylabel(self.names.get(ch, f"ch {ch}"), rotation=0, ha="right", fontsize=8)
            ax.set_ylim(SERVO_MIN - 5, SERVO_MAX + 5)
            ax.tick_params(labelsize=7)
        if marks:
            for label, tm in marks.items():
                axes[0, 0].annotate(label, (tm - t0, SERVO_MAX), fontsize=7, va="bottom")
        axes[-1, 0].set_xlabel("time, s (red lines: the given beats)")
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


class ServoKitBus(Bus):
    """PCA9685 16-channel PWM board over I2C (Adafruit ServoKit)."""

    def __init__(self, channels: int = 16, address: int = 0x40):
        try:
            from adafruit_servokit import ServoKit
        except ImportError as e:
            raise BusError("the pca9685 driver needs Adafruit ServoKit: pip install adafruit-circuitpython-servokit "
                           "(on the Pi, with I2C enabled in raspi-config)") from e
        try:
            self.kit = ServoKit(channels=channels, address=address)
        except (OSError, ValueError, RuntimeError) as e:
            raise BusError(f"no PCA9685 answered at I2C address {address:#04x}: {e}; check the wiring, "
                           "`i2cdetect -y 1` and that I2C is enabled") from e

    def write(self, commands, t):
        for ch, deg in commands.items():
            self.kit.servo[ch].angle = _clamp(deg)

    def close(self):
        kit = getattr(self, "kit", None)
        for servo in kit.servo if kit is not None else ():
            try:
                servo.angle = None  # stop the pulses: the servo goes limp instead of holding
            except (OSError, ValueError):
                pass


class SerialBus(Bus):
    """The `S<ch>:<deg>` line protocol on a serial port (pyserial if installed, else a raw POSIX tty)."""

    def __init__(self, port: str, baudrate: int = 115200):
        self.port = port
        self._serial = None
        self._fd = None
        try:
            import serial  # pyserial
        except ImportError:
            serial = None
        try:
            if serial is not None:
                self._serial = serial.Serial(port, baudrate=baudrate, timeout=0, write_timeout=0.1)
            else:
                self._fd = self._open_raw(port, baudrate)
        except (OSError, ValueError) as e:
            raise BusError(f"cannot open serial port {port!r}: {e}; check the cable and the device name "
                           "(ls /dev/ttyACM* /dev/ttyUSB*) and that you are in the 'dialout' group") from e

    @staticmethod
    def _open_raw(port: str, baudrate: int) -> int:
        import termios
        import tty

        fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            speed = getattr(termios, f"B{baudrate}", None)
            if speed is None:
                raise ValueError(f"baud rate {baudrate} is not supported by termios")
            attrs = termios.tcgetattr(fd)
            attrs[4] = attrs[5] = speed
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except Exception:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def encode(commands: dict[int, float]) -> bytes:
        return "".join(f"S{int(ch)}:{_clamp(deg):.1f}\n" for ch, deg in sorted(commands.items())).encode("ascii")

    def write(self, commands, t):
        data = self.encode(commands)
        if self._serial is not None:
            self._serial.write(data)
        else:
            os.write(self._fd, data)

    def close(self):
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


DRIVERS = ("sim", "pca9685", "serial")


def open_bus(driver: str, *, names=None, serial_port: str | None = None, baudrate: int = 115200,
             i2c_address: int = 0x40) -> Bus:
    """The one place the hardware is chosen."""
    if driver == "sim":
        return SimulatedBus(names)
    if driver == "pca9685":
        return ServoKitBus(address=i2c_address)
    if driver == "serial":
        if not serial_port:
            raise BusError("the serial driver needs --serial-port, e.g. /dev/ttyACM0")
        return SerialBus(serial_port, baudrate)
    raise BusError(f"unknown driver {driver!r}: use one of {DRIVERS}")
