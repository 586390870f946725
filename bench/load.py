"""Broker load: how many devices at 25 fps one Mosquitto carries, and how many robots can
follow one device, before the p99 delivery latency passes 50 ms.

    python -m bench.load [--steps 10,50,100,200,400] [--seconds 8]

Real processes on this machine: the project's Mosquitto (auth + ACL, `broker.launcher`),
publisher processes with one MQTT connection per simulated device, and subscriber
processes. Latency = receive time minus the `t` stamped into the payload just before
publishing (same clock). The generator shares the 2 cores with the broker: when the
publishers cannot keep 25 fps, the step is reported as generator-bound.
"""
from __future__ import annotations

from bench import write_section
import argparse
import json
import multiprocessing as mp
import os
import pathlib
import tempfile
import time

import numpy as np

FPS = 25
P99_LIMIT_MS = 50.0
WARMUP_S = 1.0  # connections settle; the first second of each step is not measured


# A pose frame as the device publishes it (`device.protocol.PoseEncoder`, keypoints with 6 decimals).
KP = np.round(np.stack([np.linspace(-0.7, 0.6, 14), np.linspace(-0.3, 0.35, 14)], axis=1) + 0.0123456, 6)
BEAT = {"bpm": 120.0, "phase": 0.5, "bar_phase": 0.25, "meter": 4, "onset": 0.3, "is_beat": False,
        "next_beat_in": 0.25}


def _payload(encoder, seq: int) -> bytes:
    now = time.time()
    return encoder.encode(seq, now, frame=seq, t_audio=seq / FPS, t_capture=now, fps=float(FPS), kp=KP,
                          heading=0.1, beat=BEAT)


def _publisher(host, port, creds, device_ids, seconds, ready, go, result_q):
    import paho.mqtt.client as mqtt
    from device.protocol import PoseEncoder

    clients = []
    for d in device_ids:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(f"device-{d}", creds[f"device-{d}"])
        c.connect(host, port, keepalive=60)
        c.loop_start()
        clients.append((d, c, PoseEncoder(d)))
    ready.put(len(clients))
    go.wait()
    sent, late_ticks, ticks = 0, 0, 0
    t0 = time.monotonic()
    seq = 0
    while time.monotonic() - t0 < seconds:
        tick_start = t0 + seq / FPS
        for d, c, enc in clients:
            c.publish(f"edgedance/v1/{d}/pose", _payload(enc, seq), qos=0)
            sent += 1
        seq += 1
        ticks += 1
        delay = t0 + seq / FPS - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif -delay > 1.0 / FPS:
            late_ticks += 1
        del tick_start
    achieved = sent / max(1e-9, time.monotonic() - t0)
    time.sleep(0.5)
    for _, c, _ in clients:
        c.loop_stop()
        c.disconnect()
    result_q.put({"sent": sent, "rate": achieved, "late_ticks": late_ticks, "ticks": ticks})


def _subscriber(host, port, user, password, topic, n_clients, seconds, ready, go, result_q):
    import paho.mqtt.client as mqtt
    lat = []

    def on_message(client, userdata, m):
        t = json.loads(m.payload)["t"]
        lat.append((t, time.time() - t))

    clients = []
    for _ in range(n_clients):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.username_pw_set(user, password)
        c.on_message = on_message
        c.connect(host, port, keepalive=60)
        c.subscribe(topic, qos=0)
        c.loop_start()
        clients.append(c)
    time.sleep(0.3)
    ready.put(n_clients)
    go.wait()
    time.sleep(seconds + 1.0)
    for c in clients:
        c.loop_stop()
        c.disconnect()
    a = np.array(lat).reshape(-1, 2)
    warm = a[:, 0] >= a[:, 0].min() + WARMUP_S if len(a) else np.zeros(0, bool)
    result_q.put((a[warm, 1] * 1000.0, int(len(a))))


def _run_step(broker, n_devices, n_robots, seconds, n_pub_procs=2, n_sub_procs=1):
    ctx = mp.get_context("fork")
    ready, results, subres = ctx.Queue(), ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    ids = [f"ld{i}" for i in range(n_devices)]
    groups = [g.tolist() for g in np.array_split(np.array(ids), min(n_pub_procs, n_devices)) if len(g)]
    procs = []
    topic = "edgedance/v1/+/pose" if n_robots == 1 else f"edgedance/v1/{ids[0]}/pose"
    per_sub = [len(g) for g in np.array_split(np.arange(n_robots), n_sub_procs) if len(g)]
    for k in per_sub:
        procs.append(ctx.Process(target=_subscriber, args=(broker.host, broker.port, "robot",
                     broker.credentials["robot"], topic, k, seconds, ready, go, subres)))
    for g in groups:
        procs.append(ctx.Process(target=_publisher, args=(broker.host, broker.port, broker.credentials, g,
                     seconds, ready, go, results)))
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    cpu0 = os.times()
    go.set()
    pubs = [results.get(timeout=seconds + 60) for _ in groups]
    got = [subres.get(timeout=seconds + 60) for _ in per_sub]
    lats = np.concatenate([g[0] for g in got])
    received = sum(g[1] for g in got)
    for p in procs:
        p.join(10)
    del cpu0
    sent = sum(r["sent"] for r in pubs)
    expected = n_devices * n_robots if n_robots > 1 else n_devices
    return {
        "devices": n_devices, "robots": n_robots,
        "target_rate": n_devices * FPS, "achieved_rate": sum(r["rate"] for r in pubs),
        "delivered_fraction": received / max(1, sent * (n_robots if n_robots > 1 else 1)),
        "p50": float(np.percentile(lats, 50)) if len(lats) else float("nan"),
        "p99": float(np.percentile(lats, 99)) if len(lats) else float("nan"),
        "max": float(lats.max()) if len(lats) else float("nan"),
        "late_ticks": sum(r["late_ticks"] for r in pubs), "expected_receivers": expected,
    }


def main(argv=None) -> str:
    from broker.launcher import Broker

    ap = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="10,50,100,200,300,400", help="device counts to try")
    ap.add_argument("--robots", default="1,10,50,100,200", help="robot counts following one device")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per step")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    robots = [int(s) for s in args.robots.split(",")]
    rows, rrows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ids = tuple(f"ld{i}" for i in range(max(steps)))
        with Broker(pathlib.Path(tmp), devices=ids, tls=False, websockets=False) as b:
            for n in steps:
                r = _run_step(b, n, 1, args.seconds)
                rows.append(r)
                print(f"devices {n}: p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms "
                      f"rate {r['achieved_rate']:.0f}/{r['target_rate']} msg/s delivered {r['delivered_fraction']:.3f}")
                if r["delivered_fraction"] < 0.9 or r["late_ticks"] > 25:  # broker or load generator overloaded: stop
                    break
            for m in robots:
                r = _run_step(b, 1, m, args.seconds, n_sub_procs=2 if m > 1 else 1)
                rrows.append(r)
                print(f"robots {m}: p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms delivered {r['delivered_fraction']:.3f}")
                if r["p99"] > P99_LIMIT_MS * 4:
                    break
    ok = [r["devices"] for r in rows if r["p99"] <= P99_LIMIT_MS and r["delivered_fraction"] >= 0.99]
    okr = [r["robots"] for r in rrows if r["p99"] <= P99_LIMIT_MS and r["delivered_fraction"] >= 0.99]
    from device.protocol import PoseEncoder

    size = len(_payload(PoseEncoder("ld0"), 1000))
    md = [f"## Broker load (one Mosquitto, 25 fps JSON pose frames as the device writes them, {size} bytes)", "",
          f"Command: `python -m bench.load --steps {args.steps} --robots {args.robots} --seconds {args.seconds:g}`", "",
          "| devices | target msg/s | achieved msg/s | delivered | p50 ms | p99 ms | max ms | generator late ticks |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['devices']} | {r['target_rate']} | {r['achieved_rate']:.0f} | {r['delivered_fraction']:.3f} | "
           f"{r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['late_ticks']} |" for r in rows]
    md += ["", "| robots following one device | p50 ms | p99 ms | max ms | delivered |", "| ---: | ---: | ---: | ---: | ---: |"]
    md += [f"| {r['robots']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['max']:.1f} | {r['delivered_fraction']:.3f} |" for r in rrows]
    md += ["", f"Devices carried with p99 ≤ {P99_LIMIT_MS:.0f} ms and ≥ 99 % delivered: "
           f"**{max(ok) if ok else 'none'}** of the steps tried; robots per device: **{max(okr) if okr else 'none'}**. "
           "Publishers, subscribers and the broker share this machine's 2 cores, so these are lower bounds "
           "for a broker on its own host.", ""]
    carried = max(ok) if ok else 0
    if carried:
        up = carried * (2.0 + 0.2)  # beats (~2/s at 120 BPM) + metrics (one per 5 s) per device
        md += ["### Past one broker", "",
               f"One Mosquitto here carried {carried} devices ({carried * FPS} pose msg/s). A larger fleet is "
               "split by site or room: each edge broker (this project's config) serves its devices, robots and "
               "displays locally, where the 25 fps pose stream belongs, and a Mosquitto bridge "
               "(`broker/bridge.example.conf`) forwards only `status`, `beat` and `metrics` to a cloud broker "
               f"and brings `cmd` down: about {up:.0f} msg/s per {carried}-device edge broker instead of "
               f"{carried * FPS} (one message in {FPS / 2.2:.0f}). 1000 devices = {-(-1000 // carried)} edge "
               f"brokers at this machine's measured capacity, and a cloud broker receiving about "
               f"{1000 * 2.2:.0f} msg/s, which one Mosquitto handles. Where poses themselves must be shared "
               "across sites (one display for every room), use a clustered broker (EMQX or VerneMQ: shared "
               "subscriptions and sessions across nodes, load-balanced listeners) rather than chaining "
               "bridges; this project ships no home-made clustering.", ""]
    return write_section("\n".join(md), "docs/bench/load.md")


if __name__ == "__main__":
    print(main())
