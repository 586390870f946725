"""Offline renderer: a pose file or a recorded message stream -> animated GIF (Pillow)
and MP4 (when ffmpeg is installed), drawn like the live page.

    python -m subscribers.display.render poses.npy --out dance.gif
    python -m subscribers.display.render stream.jsonl --out dance.gif --out dance.mp4

Inputs: `.npy` of shape (T, 14, 2) (BODY-14, y up, in [-1, 1]; optional `--heading
H.npy` of shape (T,)), or `.jsonl` with one message per line as `mosquitto_sub -t
'edgedance/v1/<id>/#'` prints it (JSON form; only valid pose messages are drawn).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from device.contract import BONES, KEYPOINTS, N_KEYPOINTS
from device.protocol import ProtocolError, decode

log = logging.getLogger(__name__)

BACKGROUND = (7, 8, 13)
STAGE = (27, 34, 54)
LEFT, RIGHT, TORSO = (56, 225, 200), (255, 107, 139), (232, 236, 245)
ACCENT, DIM = (255, 209, 102), (125, 134, 156)
PULSE_S = 0.22  # beat flash decay, as on the page


class RenderError(ValueError):
    """Input that cannot be rendered; the text names the file and what is wrong."""


@dataclasses.dataclass
class Clip:
    """What gets drawn: poses (T, 14, 2) and per-frame extras."""

    poses: np.ndarray  # (T, 14, 2) float32, y up
    fps: float
    heading: np.ndarray | None = None  # (T,) radians
    is_beat: np.ndarray | None = None  # (T,) bool
    bpm: np.ndarray | None = None  # (T,)
    meter: np.ndarray | None = None  # (T,) int
    bar_phase: np.ndarray | None = None  # (T,)

    def __len__(self):
        return len(self.poses)


# --- input ----------------------------------------------------------------------

def load_npy(path, heading_path=None, fps: float = 25.0) -> Clip:
    path = pathlib.Path(path)
    try:
        poses = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RenderError(f"{path}: cannot read a pose array ({e}); expected a .npy of shape (T, 14, 2)") from e
    if poses.ndim != 3 or poses.shape[1:] != (N_KEYPOINTS, 2) or len(poses) == 0:
        raise RenderError(f"{path}: pose array has shape {poses.shape}; expected (T, {N_KEYPOINTS}, 2) with T >= 1")
    if not np.issubdtype(poses.dtype, np.floating) or not np.isfinite(poses).all():
        raise RenderError(f"{path}: poses must be finite floats (dtype {poses.dtype})")
    heading = None
    if heading_path is not None:
        heading = np.load(heading_path, allow_pickle=False).astype(np.float32)
        if heading.shape != (len(poses),):
            raise RenderError(f"{heading_path}: heading has shape {heading.shape}; expected ({len(poses)},) to match {path}")
    return Clip(poses=poses.astype(np.float32), fps=fps, heading=heading)


def load_jsonl(path, *, skip_bad: bool = False) -> Clip:
    """Pose messages of a recorded stream (other message types are skipped)."""
    path = pathlib.Path(path)
    frames, bad = [], 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RenderError(f"{path}: cannot read the recorded stream ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            msg = decode(line)
        except ProtocolError as e:
            if not skip_bad:
                raise RenderError(f"{path}:{n}: {e} (pass --skip-bad to leave such lines out)") from e
            bad += 1
            continue
        if msg["type"] == "pose":
            frames.append(msg)
    if bad:
        log.warning("%s: skipped %d malformed line(s)", path, bad)
    if not frames:
        raise RenderError(f"{path}: no pose messages in {len(lines)} line(s); record with "
                          "mosquitto_sub -t 'edgedance/v1/<id>/pose' > stream.jsonl")
    frames.sort(key=lambda m: (m["t"], m["seq"]))
    return Clip(poses=np.array([m["kp"] for m in frames], np.float32),
                fps=float(frames[0]["fps"]),
                heading=np.array([m["heading"] for m in frames], np.float32),
                is_beat=np.array([m["beat"]["is_beat"] for m in frames]),
                bpm=np.array([m["beat"]["bpm"] for m in frames], np.float32),
                meter=np.array([m["beat"]["meter"] for m in frames]),
                bar_phase=np.array([m["beat"]["bar_phase"] for m in frames], np.float32))


def load(path, *, heading_path=None, fps: float = 25.0, skip_bad: bool = False) -> Clip:
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".npy":
        return load_npy(path, heading_path, fps)
    if suffix in (".jsonl", ".json", ".txt"):
        return load_jsonl(path, skip_bad=skip_bad)
    raise RenderError(f"{path}: unknown input type {suffix!r}; give a .npy pose array (T, 14, 2) or a .jsonl stream")


def demo_poses(n_frames: int, fps: float = 25.0, bpm: float = 120.0) -> np.ndarray:
    """A made-up dance (T, 14, 2): arms swing on the beat, knees bounce. For demos and tests."""
    rest = np.array([[0, .86], [0, .62], [-.17, .58], [-.24, .33], [-.27, .08], [.17, .58], [.24, .33], [.27, .08],
                     [-.1, 0], [-.12, -.42], [-.13, -.86], [.1, 0], [.12, -.42], [.13, -.86]], np.float32)
    t = np.arange(n_frames) / fps
    beat = 2 * math.pi * bpm / 60 * t
    out = np.repeat(rest[None], n_frames, axis=0)
    for (sh, el, wr), sign, offset in (((2, 3, 4), -1, 0.0), ((5, 6, 7), 1, math.pi)):
        swing = (1 + np.sin(beat / 2 + offset)) / 2  # 0: arm down, 1: raised, one bar per cycle
        upper = -math.pi / 2 + sign * np.radians(120) * swing  # angle from +x, y up
        lower = upper + sign * 0.6 * np.sin(beat)
        out[:, el] = out[:, sh] + 0.26 * np.stack([np.cos(upper), np.sin(upper)], -1)
        out[:, wr] = out[:, el] + 0.25 * np.stack([np.cos(lower), np.sin(lower)], -1)
    bounce = 0.05 * np.abs(np.sin(beat / 2))  # down on every beat
    out[:, :9, 1] -= bounce[:, None]
    out[:, 11, 1] -= bounce
    out[:, [9, 12], 0] += np.array([-1, 1]) * bounce[:, None]
    out[:, :, 0] += 0.06 * np.sin(beat / 4)[:, None]
    return np.clip(out, -1, 1).astype(np.float32)


# --- drawing --------------------------------------------------------------------

def _font(size: int):
    from PIL import ImageFont
    for name in ("DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    return ImageFont.load_default(size=size)


def bone_color(a: int, b: int):
    """Limbs by side (right: coral, left: teal), the trunk (neck-hips, hip-hip) white."""
    sa, sb = KEYPOINTS[a][:2], KEYPOINTS[b][:2]
    if "neck" in (KEYPOINTS[a], KEYPOINTS[b]) and ("shoulder" in KEYPOINTS[a] + KEYPOINTS[b]):
        sa = sb = (sa if sa in ("r_", "l_") else sb)
    if sa == sb == "r_":
        return RIGHT
    if sa == sb == "l_":
        return LEFT
    return TORSO


def _mix(a, b, w):
    return tuple(int(round(x + (y - x) * w)) for x, y in zip(a, b))


class Painter:
    """Draws one frame of a clip at `size` x `size` pixels (Pillow, RGB)."""

    def __init__(self, size: int = 480):
        from PIL import Image, ImageDraw
        self._Image, self._Draw = Image, ImageDraw
        self.size = size
        self.font_big, self.font_small = _font(size // 12), _font(max(9, size // 40))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.hypot(xx - size / 2, yy - size * 0.42) / (size * 0.75)
        self._glow = np.clip(1 - r, 0, 1)[..., None]  # (size, size, 1): radial stage light
        base = np.array(BACKGROUND, np.float32) + self._glow * (np.array(STAGE, np.float32) - BACKGROUND)
        self._stage = base.astype(np.uint8)

    def frame(self, clip: Clip, i: int, pulse: float):
        s = self.size
        if pulse > 0.01:
            lit = self._stage + self._glow * np.array(ACCENT, np.float32) * 0.22 * pulse
            img = self._Image.fromarray(np.clip(lit, 0, 255).astype(np.uint8))
        else:
            img = self._Image.fromarray(self._stage)
        d = self._Draw.Draw(img)
        scale, cx, cy = s * 0.4, s / 2, s * 0.52
        floor_y = cy + scale * 0.92
        d.line([(0, floor_y), (s, floor_y)], fill=_mix(BACKGROUND, DIM, 0.35), width=1)
        if pulse > 0.01:
            r = scale * (0.35 + 0.9 * (1 - pulse))
            d.ellipse([cx - r, floor_y - r * 0.18, cx + r, floor_y + r * 0.18],
                      outline=_mix(BACKGROUND, ACCENT, 0.8 * pulse), width=max(1, round(2 + 3 * pulse)))
        pts = [(cx + x * scale, cy - y * scale) for x, y in clip.poses[i]]  # y up -> image rows down
        width = max(3, round(scale * 0.045))
        for a, b in BONES:
            color = bone_color(a, b)
            d.line([pts[a], pts[b]], fill=color, width=width)
            for p in (pts[a], pts[b]):  # round caps
                d.ellipse([p[0] - width / 2, p[1] - width / 2, p[0] + width / 2, p[1] + width / 2], fill=color)
        (hx, hy), (nx, ny) = pts[0], pts[1]
        hr = max(width, 0.42 * math.hypot(hx - nx, hy - ny))
        d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=TORSO)
        # tempo and metre, when the stream carries them
        if clip.bpm is not None and clip.bpm[i] > 0:
            d.text((s * 0.05, s * 0.04), f"{clip.bpm[i]:.0f}", fill=TORSO, font=self.font_big)
            d.text((s * 0.055, s * 0.04 + self.font_big.size * 1.15), "BPM", fill=DIM, font=self.font_small)
            meter = int(clip.meter[i]) if clip.meter is not None else 0
            if meter:
                cur = int(clip.bar_phase[i] * meter) % meter
                for k in range(meter):
                    x, y, r = s * 0.065 + k * s * 0.045, s * 0.04 + self.font_big.size * 1.9, s * 0.012
                    d.ellipse([x - r, y - r, x + r, y + r], fill=ACCENT if k == cur else _mix(BACKGROUND, DIM, 0.4))
        if clip.heading is not None:
            x, y, r = s - s * 0.1, s * 0.1, s * 0.055
            d.ellipse([x - r, y - r, x + r, y + r], outline=_mix(BACKGROUND, DIM, 0.5), width=1)
            h = float(clip.heading[i])
            d.line([(x, y), (x + math.sin(h) * r * 0.8, y + math.cos(h) * r * 0.8)], fill=ACCENT, width=3)
        # time and a progress bar: also keeps every frame distinct, so the GIF keeps them all
        d.text((s * 0.05, s - s * 0.07), f"{i / clip.fps:6.2f} s   frame {i + 1}/{len(clip)}", fill=DIM,
               font=self.font_small)
        d.rectangle([0, s - 3, s * (i + 1) / len(clip), s], fill=_mix(BACKGROUND, LEFT, 0.6))
        return img


def frames(clip: Clip, size: int = 480):
    """Yield one PIL image per pose frame."""
    painter = Painter(size)
    last_beat = -1e9
    for i in range(len(clip)):
        t = i / clip.fps
        if clip.is_beat is not None and clip.is_beat[i]:
            last_beat = t
        yield painter.frame(clip, i, math.exp(-(t - last_beat) / PULSE_S) if last_beat > -1e8 else 0.0)


# --- output ---------------------------------------------------------------------

def write_gif(clip: Clip, out, size: int = 480) -> pathlib.Path:
    out = pathlib.Path(out)
    images = [im.quantize(colors=255, method=2, dither=1) for im in frames(clip, size)]  # method 2: fast octree
    # GIF delays are in 1/100 s: 25 fps -> 40 ms exactly; other rates round.
    images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / clip.fps),
                   loop=0, optimize=False, disposal=1)
    log.info("wrote %s: %d frames at %.1f fps", out, len(images), clip.fps)
    return out


def write_mp4(clip: Clip, out, size: int = 480) -> pathlib.Path:
    out = pathlib.Path(out)
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        raise RenderError(f"{out}: MP4 needs ffmpeg (Debian package 'ffmpeg'); write a .gif instead")
    size -= size % 2  # yuv420p needs even sizes
    cmd = [ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{size}x{size}",
           "-r", f"{clip.fps:g}", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart",
           str(out)]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            for im in frames(clip, size):
                proc.stdin.write(im.tobytes())
        except BrokenPipeError:
            pass
        finally:
            proc.stdin.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.wait()
    if proc.returncode != 0:
        raise RenderError(f"{out}: ffmpeg failed with code {proc.returncode}: {err.strip()}")
    log.info("wrote %s: %d frames at %.1f fps", out, len(clip), clip.fps)
    return out


def render(clip: Clip, out, size: int = 480) -> pathlib.Path:
    suffix = pathlib.Path(out).suffix.lower()
    if suffix == ".gif":
        return write_gif(clip, out, size)
    if suffix == ".mp4":
        return write_mp4(clip, out, size)
    raise RenderError(f"{out}: unknown output type {suffix!r}; use .gif or .mp4")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m subscribers.display.render",
                                 description="Render poses (.npy, (T, 14, 2)) or a recorded stream (.jsonl) "
                                             "to an animated GIF and/or MP4.")
    ap.add_argument("input", nargs="?", help="poses .npy (T, 14, 2) or recorded stream .jsonl")
    ap.add_argument("--out", action="append", default=None,
                    help="output .gif or .mp4 (MP4 needs ffmpeg); repeat for both (default dance.gif)")
    ap.add_argument("--heading", default=None, help="with a .npy: heading .npy of shape (T,), radians")
    ap.add_argument("--fps", type=float, default=25.0, help="frame rate of a .npy input (default 25)")
    ap.add_argument("--size", type=int, default=480, help="square frame size in pixels (default 480)")
    ap.add_argument("--max-frames", type=int, default=None, help="render only the first N frames")
    ap.add_argument("--skip-bad", action="store_true", help="leave malformed lines of a .jsonl out instead of failing")
    ap.add_argument("--demo", type=float, default=None, metavar="SECONDS",
                    help="render a made-up dance of this length instead of an input file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.input is None) == (args.demo is None):
        ap.error("give an input file or --demo SECONDS (not both)")
    if args.size < 64 or args.fps <= 0:
        ap.error("--size must be >= 64 and --fps > 0")
    try:
        if args.demo is not None:
            clip = Clip(poses=demo_poses(max(1, round(args.demo * args.fps)), args.fps), fps=args.fps)
        else:
            clip = load(args.input, heading_path=args.heading, fps=args.fps, skip_bad=args.skip_bad)
        if args.max_frames:
            clip = dataclasses.replace(clip, **{f.name: getattr(clip, f.name)[:args.max_frames]
                                                for f in dataclasses.fields(clip)
                                                if isinstance(getattr(clip, f.name), np.ndarray)})
        for out in args.out or ["dance.gif"]:
            path = render(clip, out, args.size)
            print(f"{path}: {len(clip)} frames, {len(clip) / clip.fps:.2f} s")
    except RenderError as e:
        print(f"render: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
