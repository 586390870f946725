"""Edge offload through a real Mosquitto: features out, a pool of workers, poses back."""
import threading
import time

import numpy as np
import pytest

from broker.launcher import Broker
from device import features, offload, protocol
from device.audio import resample, to_pcm16
from device.contract import DEFAULT_FEATURES
from device.demo import synthesize_song
from device.model import load_bundle

pytestmark = pytest.mark.train  # the tiny bundle is built with TensorFlow


@pytest.fixture(scope="module")
def song_features():
    pcm = to_pcm16(resample(synthesize_song(seconds=6.0, bpm=120, meter=4), 22050, 16000))
    return features.extract(pcm, DEFAULT_FEATURES)  # 150 frames


def test_window_messages_are_valid_and_carry_context(song_features):
    w = offload.FeatureWindow("pi1", DEFAULT_FEATURES.config_hash(), 25.0, context=10)
    msgs = w.messages(song_features, t_capture=time.time())
    assert len(msgs) == len(song_features)
    for m in msgs:
        protocol.decode(protocol.encode_json(m), "edgedance/v1/pi1/features")
    assert msgs[0]["context"] == 0 and len(msgs[0]["x"]) == 1
    assert msgs[-1]["context"] == 10 and len(msgs[-1]["x"]) == 11
    assert np.allclose(msgs[-1]["x"][-1], song_features.x[-1], atol=1e-4)


def test_worker_pool_shares_the_load_and_keeps_the_stream_ordered(tmp_path, tiny_bundle, song_features):
    bundle = load_bundle(tiny_bundle)
    n = 60
    with Broker(tmp_path, devices=("pi1",), tls=False, websockets=False) as b:
        factory = offload.paho_factory(b.host, b.port, "worker", b.credentials["worker"])
        got, lock = [], threading.Lock()
        done = threading.Event()

        def on_message(client, userdata, m):
            msg = protocol.decode(m.payload, m.topic)
            with lock:
                got.append(msg)
                if len(got) >= n:
                    done.set()

        robot = b.client("robot")
        robot.on_message = on_message
        robot.subscribe("edgedance/v1/pi1/pose", qos=0)
        dev = b.client("device-pi1")
        with offload.Worker(bundle, factory) as w1, offload.Worker(bundle, factory) as w2:
            time.sleep(0.3)  # subscriptions in place
            win = offload.FeatureWindow("pi1", bundle.manifest["feature_hash"], 25.0, context=20)
            msgs = win.messages(song_features, time.time())[:n]
            for m in msgs:
                dev.publish("edgedance/v1/pi1/features", protocol.encode_json(m), qos=0)
                time.sleep(0.01)
            assert done.wait(20), f"only {len(got)} of {n} poses came back"
            assert w1.handled > 0 and w2.handled > 0, "the shared subscription did not spread the load"
            assert w1.handled + w2.handled == n and w1.rejected == w2.rejected == 0
        frames = sorted(m["frame"] for m in got)
        assert frames == list(range(n))
        # Each pose equals the stateless replay of its window, whichever worker made it.
        ref = bundle.stepper()
        last = msgs[-1]
        poses, _ = ref.run(np.asarray(last["x"], np.float32))
        mine = next(m for m in got if m["frame"] == last["frame"])
        assert np.abs(np.asarray(mine["kp"]) - poses[-1]).max() < 1e-6


def test_worker_rejects_features_from_another_config(tiny_bundle, song_features):
    bundle = load_bundle(tiny_bundle)
    w = offload.Worker(bundle, client_factory=None)
    msg = offload.FeatureWindow("pi1", "0" * 16, 25.0, context=3).messages(song_features, time.time())[5]

    class M:
        topic = "edgedance/v1/pi1/features"
        payload = protocol.encode_json(msg)

    class C:
        published = []

        def publish(self, *a, **k):
            self.published.append(a)

    c = C()
    w._on_message(c, None, M())
    assert w.rejected == 1 and not c.published
