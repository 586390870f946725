"""The slow fault runs: a 30 s broker outage and a 30 s network partition (plus the short faults),
real Mosquitto, the device as a process (`python -m device run`, file source at real-time pace).

    python -m bench.faults [--outage 30] [--partition 30] [--model models/default] [--only NAME ...]

The scenarios are those of tests/test_faults.py (tests/faultlib.py), with long faults. The
partition runs twice: with the device's default keep-alive (30 s) and with the smallest (5 s).
Writes docs/bench/faults.md; docs/reliability.md holds the fault table built from it.
"""
from __future__ import annotations

from bench import write_section
import argparse
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the harness lives with the tests

import faultlib as fl  # noqa: E402

SCENARIOS = ("broker", "partition-default", "partition-5", "kill", "stalled", "disk")


def _bundle(arg: str | None, tmp: pathlib.Path) -> tuple[pathlib.Path, str]:
    if arg and (pathlib.Path(arg) / "manifest.json").exists():
        return pathlib.Path(arg), arg
    from converter.bundle import make_test_bundle
    from device import features
    from device.contract import DEFAULT_FEATURES
    return (make_test_bundle(tmp / "bundle", n_features=features.n_features(DEFAULT_FEATURES)),
            "a test bundle (random weights; models/default missing)")


def _s(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _row(name: str, r: dict) -> str:
    if name == "broker":
        rec = f"status online {_s(r['online_after_up_s'])} s, poses {_s(r['pose_after_up_s'])} s after the broker is up"
        robot = f"neutral after {_s(r['robot_neutral_s'])} s; dancing {_s(r['robot_moving_again_s'])} s after"
    elif name.startswith("partition"):
        noticed = "yes" if r["device_noticed"] else "no"
        rec = (f"will `offline` {_s(r['offline_s'])} s into it; device noticed: {noticed}; "
               f"online again {_s(r['online_after_heal_s'])} s, poses {_s(r['pose_after_heal_s'])} s after the heal; "
               f"{r['late_poses']} pose frames delivered > 1 s late")
        robot = f"neutral after {_s(r['robot_neutral_s'])} s; dancing {_s(r['robot_moving_again_s'])} s after heal"
    elif name == "kill":
        rec = (f"will `offline` {_s(r['offline_s'], '{:.3f}')} s; restarted {_s(r['restarted_after_s'])} s, "
               f"online {_s(r['online_s'])} s, poses {_s(r['pose_s'])} s after the kill")
        robot = (f"neutral {_s(r['robot_neutral_s'])} s after the kill; "
                 f"dancing {_s(r['robot_moving_again_s'])} s after online")
    elif name == "stalled":
        rss0, peak = r["broker_rss_kb"]
        b, st, fl_ = r["latency_ms_before"], r["latency_ms_stalled"], r["latency_ms_flood"]
        rec = (f"the others' delivery p50/p99: {b[0]:.1f}/{b[1]:.0f} ms before, {st[0]:.1f}/{st[1]:.0f} ms with the "
               f"stalled client, {fl_[0]:.1f}/{fl_[1]:.0f} ms during the flood (CPU-bound here); broker RSS "
               f"{rss0 / 1024:.1f} → {peak / 1024:.1f} MB")
        robot = "kept following" if r["robot_alive"] else "STOPPED"
    else:
        rec = f"exit code {r['returncode']}, log bytes written {r['log_bytes']}, states {r['states']}"
        robot = "kept following"
    lost = (f"poses {r['pose_lost']} of {r['poses'] + r['pose_lost']}, beats {r['beat_lost']} of "
            f"{r['beats'] + r['beat_lost']}")
    if r.get("beat_reordered"):
        lost += f" ({r['beat_reordered']} out of order)"
    return f"| {r['fault']} | {rec} | {robot} | {lost} |"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--outage", type=float, default=30.0, help="broker outage, s (default 30)")
    ap.add_argument("--partition", type=float, default=30.0, help="partition length, s (default 30)")
    ap.add_argument("--model", default="models/default", help="bundle dir (default: the shipped one)")
    ap.add_argument("--only", nargs="*", choices=SCENARIOS, help="run only these scenarios")
    ap.add_argument("--out", default="docs/bench/faults.md")
    args = ap.parse_args(argv)
    from device.demo import write_song

    chosen = args.only or SCENARIOS
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        bundle, bundle_name = _bundle(args.model, tmp)
        song = write_song(tmp / "song.wav", seconds=20)
        restart_sec, where = fl.unit_restart_sec()
        runs = {
            "broker": lambda d: fl.scenario_broker_restart(d, song, bundle, args.outage),
            "partition-default": lambda d: fl.scenario_partition(d, song, bundle, args.partition, 30),
            "partition-5": lambda d: fl.scenario_partition(d, song, bundle, args.partition, 5),
            "kill": lambda d: fl.scenario_device_kill(d, song, bundle, restart_sec),
            "stalled": lambda d: fl.scenario_stalled_subscriber(d, song, bundle, 10.0),
            "disk": lambda d: fl.scenario_full_log_disk(d, song, bundle, 10.0),
        }
        for name in chosen:
            d = tmp / name
            d.mkdir()
            print(f"bench.faults: {name} ...", file=sys.stderr, flush=True)
            r = runs[name](d)
            crashed = "Traceback" in r.get("device_log", "")
            rows.append(_row(name, r) + (" **device traceback** |" if crashed else ""))
    cmd = "python -m bench.faults" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    md = ["## Faults, long versions", "",
          f"Command: `{cmd}` ({time.time() - t0:.0f} s; bundle: {bundle_name}; supervisor RestartSec "
          f"{restart_sec:g} s from {where}). Real Mosquitto, the device as a process (file source, real-time "
          "pace, default settings unless the row says otherwise), the simulated robot (watchdog 0.5 s + glide "
          "1.0 s) and a recorder subscribed as the display user. The partition is a TCP proxy that stops "
          "forwarding in both directions (no FIN, no RST). Times are seconds from the start of the fault unless "
          "the cell says otherwise; pose frames are lost by policy (only the newest second is kept offline).", "",
          "| fault | device and display | robot | lost |", "| --- | --- | --- | --- |", *rows, ""]
    return write_section("\n".join(md), REPO / args.out)


if __name__ == "__main__":
    print(main())
