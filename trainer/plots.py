"""Plots for the run folder and docs: loss curves, stick-figure strips, an animated GIF (matplotlib Agg, pillow)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from device.contract import BONES, KP  # noqa: E402

RIGHT_COLOR, LEFT_COLOR, MID_COLOR = "tab:red", "tab:blue", "0.3"


def _bone_color(a: int, b: int) -> str:
    names = [k for k, v in KP.items() if v in (a, b)]
    if any(n.startswith("r_") for n in names):
        return RIGHT_COLOR
    if any(n.startswith("l_") for n in names):
        return LEFT_COLOR
    return MID_COLOR


def draw_pose(ax, pose: np.ndarray, dx: float = 0.0, alpha: float = 1.0, lw: float = 2.0) -> list:
    """One (14, 2) pose as a stick figure; the dancer's right side red, left side blue."""
    artists = []
    for a, b in BONES:
        (ln,) = ax.plot([pose[a, 0] + dx, pose[b, 0] + dx], [pose[a, 1], pose[b, 1]],
                        color=_bone_color(a, b), lw=lw, alpha=alpha, solid_capstyle="round")
        artists.append(ln)
    artists.append(ax.scatter([pose[KP["head"], 0] + dx], [pose[KP["head"], 1]], s=60, color=MID_COLOR, alpha=alpha))
    return artists


def loss_curves(history: dict, path: str | os.PathLike, title: str = "loss") -> None:
    """history: name -> list of values per epoch (e.g. {'loss': [...], 'val_loss': [...]})."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, vals in history.items():
        ax.plot(np.arange(1, len(vals) + 1), vals, label=name)
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stick_strip(rows: dict, path: str | os.PathLike, n: int = 10, fps: float = 25.0, step: int | None = None,
                start: int = 0) -> None:
    """rows: label -> poses (T, 14, 2); n figures per row, `step` frames apart (default 0.4 s)."""
    step = step or max(1, int(0.4 * fps))
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.3 * n, 2.6 * len(rows)), squeeze=False)
    for ax, (label, poses) in zip(axes[:, 0], rows.items()):
        for i in range(n):
            t = start + i * step
            if t < len(poses):
                draw_pose(ax, np.asarray(poses[t]), dx=2.2 * i)
                ax.text(2.2 * i, -1.15, f"{t / fps:.1f}s", ha="center", fontsize=7)
        ax.set_xlim(-1.1, 2.2 * (n - 1) + 1.1)
        ax.set_ylim(-1.25, 1.05)
        ax.set_aspect("equal")
        ax.set_axis_off()
        ax.set_title(label, fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def animate_gif(rows: dict, path: str | os.PathLike, fps: float = 25.0, max_frames: int = 250, every: int = 2) -> None:
    """An animated GIF, one panel per label (e.g. {'generated': P, 'ground truth': G}), with pillow."""
    from PIL import Image

    n = min(max_frames, min(len(p) for p in rows.values()))
    frames = []
    fig, axes = plt.subplots(1, len(rows), figsize=(2.4 * len(rows), 2.8), squeeze=False)
    for t in range(0, n, every):
        for ax, (label, poses) in zip(axes[0], rows.items()):
            ax.clear()
            draw_pose(ax, np.asarray(poses[t]))
            ax.set_xlim(-1, 1)
            ax.set_ylim(-1.1, 1.0)
            ax.set_aspect("equal")
            ax.set_axis_off()
            ax.set_title(f"{label}  {t / fps:.1f}s", fontsize=8)
        fig.canvas.draw()
        frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3]).quantize(colors=32))
    plt.close(fig)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 * every / fps), loop=0)


def skeleton_check(data_root: str | os.PathLike, path: str | os.PathLike,
                   dances=("DANCE_W_1", "DANCE_C_2", "DANCE_T_5"), frames=(100, 400, 700)) -> None:
    """docs/results/skeleton_check.png: each dance's raw 23 joints seen from the front (numbered,
    side 3-11 blue, 12-20 red), from the side (toes and knees point to the front), and the
    BODY-14 result for a few frames."""
    import json
    import pathlib

    from trainer import skeleton as S

    fig, axes = plt.subplots(len(dances), 3, figsize=(12, 4.2 * len(dances)), squeeze=False)
    for row, name in zip(axes, dances):
        sk = np.array(json.load(open(pathlib.Path(data_root) / name / "skeletons.json"))["skeletons"])
        t0 = frames[0]
        lft = S.left_axis(sk)[t0]
        front = np.cross([0.0, 1.0, 0.0], lft)
        root = 0.5 * (sk[t0, 7] + sk[t0, 16])
        rel = sk[t0] - root
        lat, fw, up = rel @ lft, rel @ front, rel[:, 1]
        colors = ["0.3"] * 3 + [LEFT_COLOR] * 9 + [RIGHT_COLOR] * 9 + ["0.6"] * 2
        for ax, hx, title in ((row[0], lat, f"{name} frame {t0}: front view (x = dancer's left)"),
                              (row[1], fw, "side view (x = dancer's front)")):
            ax.scatter(hx, up, c=colors, s=18)
            for j in range(S.N_JOINTS):
                ax.annotate(str(j), (hx[j], up[j]), fontsize=7, xytext=(2, 2), textcoords="offset points")
            for a, b in ((3, 4), (4, 5), (5, 6), (7, 8), (8, 9), (9, 10), (10, 11), (12, 13), (13, 14), (14, 15),
                         (16, 17), (17, 18), (18, 19), (19, 20), (3, 12), (7, 16), (0, 1)):
                ax.plot([hx[a], hx[b]], [up[a], up[b]], color=colors[a], lw=1)
            ax.set_aspect("equal")
            ax.set_title(title, fontsize=9)
        poses, _ = S.to_body_frame(sk)
        for i, t in enumerate(frames):
            if t < len(poses):
                draw_pose(row[2], poses[t], dx=2.0 * i)
        row[2].set_aspect("equal")
        row[2].set_xlim(-1, 2.0 * (len(frames) - 1) + 1)
        row[2].set_ylim(-1, 1)
        row[2].set_title(f"BODY-14 body frame, frames {list(frames)} (right side red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m trainer.plots", description="Data plots for docs/results.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("skeleton-check", help="plot raw joints and the BODY-14 mapping of a few real frames")
    p.add_argument("data", help="the Music-to-Dance folder")
    p.add_argument("--out", default="docs/results/skeleton_check.png")
    args = ap.parse_args(argv)
    if args.cmd == "skeleton-check":
        skeleton_check(args.data, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
