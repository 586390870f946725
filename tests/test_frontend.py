"""Fixed-point log-Mel frontend: exact values, streaming == batch, float-reference bounds, no overflow."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from device.contract import DEFAULT_FEATURES, FeatureConfig
from device.frontend import Frontend, log_mel
from device.frontend_ref import log_mel_ref, mel_weights, reference_power

CFG = DEFAULT_FEATURES
HOP, N_FFT, N_MELS = CFG.hop_length, CFG.n_fft, CFG.n_mels
FLOOR_Q8 = -25600  # -100 dB * 256
GOLDEN = pathlib.Path(__file__).parent / "golden" / "frontend_seed1234.npy"
# The fixed-point output vs the float64 reference over bins above -80 dBFS, on tones and noise.
# The output is quantized to 1/256 dB; the rest is the Q15 window's rounding, visible only in
# bins ~80 dB below a full-scale component (see the amplitude bound in the property test).
MAX_ERR_DB = 0.1
MEAN_ERR_DB = 0.01


def db(x_q8: np.ndarray) -> np.ndarray:
    return x_q8.astype(np.float64) / 256.0


def err_above(fixed_q8: np.ndarray, ref_db: np.ndarray, level_db: float = -80.0) -> np.ndarray:
    mask = ref_db > level_db
    return np.abs(db(fixed_q8) - ref_db)[mask]


def golden_signal() -> np.ndarray:
    """0.5 s: two tones, a chirp and noise at moderate level, seed 1234."""
    rng = np.random.default_rng(1234)
    t = np.arange(8000) / CFG.sample_rate_hz
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3000 * t)
         + 0.1 * np.sin(2 * np.pi * (100 + 4000 * t) * t) + 0.02 * rng.standard_normal(len(t)))
    return np.round(x * 32767).astype(np.int16)


# --- made-up signals, exact expected integers ---------------------------------

def test_silence_is_floor_everywhere():
    out = log_mel(np.zeros(4000, np.int16))
    assert out.dtype == np.int16 and out.shape == (4000 // HOP, N_MELS)
    assert np.all(out == FLOOR_Q8)


def test_shapes_and_causal_frame_count():
    assert log_mel(np.zeros(HOP - 1, np.int16)).shape == (0, N_MELS)
    assert log_mel(np.ones(HOP, np.int16)).shape == (1, N_MELS)
    assert log_mel(np.ones(10 * HOP + 7, np.int16)).shape == (10, N_MELS)


def test_frame_i_sees_only_its_samples():
    """An impulse at sample s shows in frames i with (i+1)*hop - n_fft <= s < (i+1)*hop only."""
    x = np.zeros(40 * HOP, np.int16)
    s = 2000
    x[s] = 20000
    out = log_mel(x)
    lit = np.flatnonzero((out > FLOOR_Q8).any(axis=1))
    first, last = s // HOP, (s + N_FFT) // HOP - 1  # window weight 0 at the frame's first sample
    assert lit.min() == first and lit.max() <= last and len(lit) >= last - first


def test_bin_centred_sine_matches_closed_form():
    """A sine on bin k0 through a periodic Hann window has exactly three non-zero bins:
    |X_k0| = A N / 4 and |X_k0±1| = A N / 8, so band m reads A² (w[m,k0] + (w[m,k0-1] + w[m,k0+1]) / 4)."""
    k0, amp = 40, 16384  # 1250 Hz, -6.02 dBFS
    n = np.arange(30 * HOP)
    x = np.round(amp * np.sin(2 * np.pi * k0 * n / N_FFT + 0.3)).astype(np.int16)
    out = log_mel(x)[5:]  # frames that lie wholly inside the signal
    w = mel_weights(CFG)
    a = amp / 32768
    gain = w[:, k0] + (w[:, k0 - 1] + w[:, k0 + 1]) / 4
    hit = gain > 0
    expected_q8 = np.round(256 * 10 * np.log10(a * a * gain[hit]))  # e.g. band 12: -1478 (-5.77 dB)
    assert np.all(np.abs(out[:, hit] - expected_q8) <= 2), (out[0, hit], expected_q8)
    assert np.all(out[:, ~hit] <= -90 * 256)  # only int16 rounding noise elsewhere


def test_impulse_has_flat_spectrum():
    """x = A at the window's centre (w = 1): |X_k| = A for every k, band m reads A² * sum_k w[m, k] / P_REF."""
    amp = 12345
    i = 10
    x = np.zeros(20 * HOP, np.int16)
    x[(i + 1) * HOP - N_FFT + N_FFT // 2] = amp
    out = log_mel(x)[i]
    expected_q8 = np.round(256 * 10 * np.log10((amp / 32768) ** 2 * mel_weights(CFG).sum(axis=1) / reference_power(CFG)))
    assert np.all(np.abs(out - expected_q8) <= 2), (out, expected_q8)


def test_golden_frames():
    out = log_mel(golden_signal())
    if os.environ.get("EDGEDANCE_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        np.save(GOLDEN, out)
    golden = np.load(GOLDEN)
    assert golden.dtype == np.int16 and golden.shape == (50, N_MELS)
    np.testing.assert_array_equal(out, golden)


def extreme_signal() -> np.ndarray:
    """Full-scale squares, DC, random signs, impulses and +-2 LSB noise, 24 hops each: the largest
    FFT values (where float64 must still hold every integer exactly) and the smallest."""
    n = 24 * HOP
    i = np.arange(n)
    rng = np.random.default_rng(2024)
    parts = [np.where((i // 3) % 2 == 0, 32767, -32768), np.where((i // 40) % 2 == 0, 32767, -32768),
             np.full(n, -32768), rng.choice([-32768, 32767], n), np.where(i % 97 == 0, -32768, 0),
             rng.integers(-32768, 32768, n) >> 14]
    return np.concatenate(parts).astype(np.int16)


def test_extremes_golden():
    """Bit-exact against frames made by the earlier all-int64 implementation of the same arithmetic
    (tests/golden/frontend_extremes.npy), for the extreme inputs, in batch and in 640-sample chunks."""
    path = GOLDEN.parent / "frontend_extremes.npy"
    x = extreme_signal()
    out = log_mel(x)
    if os.environ.get("EDGEDANCE_REGEN_GOLDEN"):
        np.save(path, out)
    golden = np.load(path)
    assert golden.dtype == np.int16 and golden.shape == (len(x) // HOP, N_MELS)
    np.testing.assert_array_equal(out, golden)
    fe = Frontend()
    np.testing.assert_array_equal(np.concatenate([fe.process(x[i:i + 640]) for i in range(0, len(x), 640)]), golden)


# --- streaming == batch ---------------------------------------------------------

def test_streaming_random_chunks_equals_batch():
    rng = np.random.default_rng(7)
    x = np.concatenate([golden_signal(), (rng.standard_normal(60000) * 800).astype(np.int16), golden_signal()])
    batch = log_mel(x)
    for trial in range(3):
        fe, pos = Frontend(), 0
        outs = [fe.process(x[:0])]
        sizes = [1, HOP - 1, HOP, 640, 30000]  # 30000 > one block: exercises the block loop
        while pos < len(x):
            n = int(rng.choice([rng.integers(0, 2000), rng.choice(sizes)]))
            outs.append(fe.process(x[pos: pos + n]))
            pos += n
        np.testing.assert_array_equal(np.concatenate(outs), batch)


def test_block_size_and_reset_do_not_change_output():
    x = golden_signal()
    fe = Frontend(block_frames=3)
    first = fe.process(x)
    np.testing.assert_array_equal(first, log_mel(x))
    fe.process(np.full(777, 30000, np.int16))
    fe.reset()
    np.testing.assert_array_equal(fe.process(x), first)


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="int16"):
        log_mel(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="mono"):
        Frontend().process(np.zeros((1000, 2), np.int16))


# --- fixed point vs float reference ------------------------------------------------

@pytest.mark.parametrize("level_db", [0, -20, -40, -60])
def test_tones_and_noise_within_bound_of_float_reference(level_db):
    rng = np.random.default_rng(level_db + 100)
    t = np.arange(2 * CFG.sample_rate_hz) / CFG.sample_rate_hz
    g = 10 ** (level_db / 20)
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (55.0, 440.0, 1234.5, 5000.0)) / 4
    for sig in (tones, rng.standard_normal(len(t)) / 4, tones / 2 + rng.standard_normal(len(t)) / 8):
        x = np.round(np.clip(g * sig, -1, 1) * 32767).astype(np.int16)
        e = err_above(log_mel(x), log_mel_ref(x, CFG))
        assert e.size > 100
        assert e.max() <= MAX_ERR_DB and e.mean() <= MEAN_ERR_DB, (e.max(), e.mean())


@pytest.mark.parametrize("cfg", [
    FeatureConfig(n_fft=1024, hop_length=320, n_mels=64, fmin_hz=20.0),
    FeatureConfig(n_fft=256, hop_length=128, n_mels=64, fmin_hz=20.0),  # Mel segments without bins
], ids=["n_fft1024", "n_fft256_empty_segments"])
def test_other_configs_match_their_reference(cfg):
    x = golden_signal()
    out = log_mel(x, cfg)
    assert out.shape == (len(x) // cfg.hop_length, cfg.n_mels)
    e = err_above(out, log_mel_ref(x, cfg))
    assert e.size > 100 and e.max() <= MAX_ERR_DB


# --- property tests: no overflow or wrap for any int16 input -----------------------

N_SAMPLES = st.integers(0, 12) .map(lambda n: n * HOP + 37)


@st.composite
def adversarial_pcm(draw):
    n = draw(N_SAMPLES)
    kind = draw(st.sampled_from(["random", "square", "dc", "impulses", "clipped", "mixed"]))
    if kind == "random":
        return draw(hnp.arrays(np.int16, n, elements=st.integers(-32768, 32767)))
    idx = np.arange(n)
    if kind == "square":
        period = draw(st.integers(2, 400))
        phase = draw(st.integers(0, 399))
        return np.where(((idx + phase) // (period // 2 or 1)) % 2 == 0, 32767, -32768).astype(np.int16)
    if kind == "dc":
        return np.full(n, draw(st.sampled_from([-32768, 32767, -1, 1, 12345])), np.int16)
    if kind == "impulses":
        x = np.zeros(n, np.int16)
        pos = draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=20)) if n else []
        x[pos] = draw(st.sampled_from([-32768, 32767]))
        return x
    if kind == "clipped":
        f = draw(st.floats(20, 7900))
        gain = draw(st.floats(1, 1000))
        return np.clip(np.round(gain * 32767 * np.sin(2 * np.pi * f * idx / CFG.sample_rate_hz)),
                       -32768, 32767).astype(np.int16)
    a = draw(hnp.arrays(np.int16, n, elements=st.integers(-32768, 32767)))
    quiet = draw(st.integers(0, 15))
    return (a >> quiet).astype(np.int16)  # random at -0 .. -90 dBFS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adversarial_pcm())
def test_any_int16_input_stays_in_range_and_near_reference(x):
    out = log_mel(x)
    assert out.dtype == np.int16 and out.shape == (len(x) // HOP, N_MELS)
    assert np.all(out >= FLOOR_Q8)
    assert np.all(out <= 7 * 256)  # full-scale DC or squares read at most ~ +6 dB
    ref = log_mel_ref(x, CFG)
    # Bound in amplitude (the Mel band's weighted l2 norm, re sqrt(P_REF)): the Q15 window differs
    # from the float one by <= 2**-16 per sample, so a bin's DFT by <= 512 * 2**-16 * (full scale)
    # = 2**-14 sqrt(P_REF), and a band's norm by <= 2**-14 sqrt(sum_k w[m, k]) (triangle inequality).
    # Plus 0.2 % for the 1/256-dB output step, the log table and the FFT's rounding.
    bound = 2.0 ** -14 * np.sqrt(mel_weights(CFG).sum(axis=1))  # (n_mels,)
    amp_fixed, amp_ref = 10 ** (db(out) / 20), 10 ** (ref / 20)
    above = ref > -80
    assert np.all((np.abs(amp_fixed - amp_ref) <= bound + 0.002 * amp_ref)[above])
    assert np.all(out[ref < -101] <= -99 * 256)  # wrap-around would show up as loud bins here


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.int16, N_SAMPLES, elements=st.integers(-16384, 16383)))
def test_doubling_the_input_adds_exactly_6_dB(x):
    """Block floating point makes the scale exact: 2x has the same mantissas and exponent + 1,
    so every unfloored bin rises by 20 log10(2) = 6.0206 dB = 1541.27 in Q7.8."""
    a, b = log_mel(x).astype(np.int32), log_mel((x * 2).astype(np.int16)).astype(np.int32)
    both = a > FLOOR_Q8
    assert np.all(b >= a)
    assert np.all(np.isin(b[both] - a[both], [1541, 1542]))


# --- real music ----------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.parametrize("dance", ["DANCE_C_2", "DANCE_W_1"])
def test_real_music_mean_error_within_half_a_dB(real_data, dance):
    import soundfile as sf

    from device.audio import resample, to_pcm16

    path = real_data / dance / "audio.mp3"
    with sf.SoundFile(str(path)) as f:
        f.seek(int(40 * f.samplerate))
        x = f.read(int(30 * f.samplerate), dtype="float32", always_2d=True).mean(axis=1)
        sr = f.samplerate
    pcm = to_pcm16(resample(x, sr, CFG.sample_rate_hz))
    assert len(pcm) >= 29 * CFG.sample_rate_hz
    e = err_above(log_mel(pcm), log_mel_ref(pcm, CFG))
    assert e.size > 10000
    assert e.mean() <= 0.5, e.mean()
    assert e.mean() <= MEAN_ERR_DB and e.max() <= MAX_ERR_DB, (e.mean(), e.max())  # what we actually reach
