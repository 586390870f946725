"""device.audio file input: formats, rates, stereo mix-down, clear errors."""
import subprocess

import numpy as np
import pytest
import soundfile as sf

from device.audio import AudioError, load_file, read_float, resample

SR = 16000


def _tone(sr, seconds=1.0, hz=440.0, stereo=False):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([x, -x * 0.0 + x], axis=1) if stereo else x


@pytest.mark.parametrize("sr", [16000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_rates_and_formats_give_the_same_16k_signal(tmp_path, sr, fmt):
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, _tone(sr, stereo=True), sr, format=fmt, subtype="PCM_16")
    pcm = load_file(path)
    assert pcm.dtype == np.int16 and abs(len(pcm) - SR) <= 1
    ref = np.round(0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(len(pcm)) / SR))
    assert np.abs(pcm[100:-100] - ref[100:-100]).max() < 0.002 * 32767


def test_stereo_is_mixed_to_mono(tmp_path):
    x = np.zeros((SR, 2))
    x[:, 0] = 0.4
    x[:, 1] = -0.2
    sf.write(tmp_path / "dc.wav", x, SR)
    mono, sr = read_float(tmp_path / "dc.wav")
    assert sr == SR and np.allclose(mono, 0.1, atol=1e-4)


def test_mp3_decodes(tmp_path):
    wav = tmp_path / "t.wav"
    sf.write(wav, _tone(44100), 44100)
    mp3 = tmp_path / "t.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), str(mp3)], check=True)
    pcm = load_file(mp3)
    assert abs(len(pcm) - SR) < 0.1 * SR and np.abs(pcm).max() > 0.4 * 32767


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        load_file(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_file(tmp_path / "empty.wav")
    (tmp_path / "text.mp3").write_text("this is not audio at all " * 20)
    with pytest.raises(AudioError, match="text.mp3.*cannot be decoded"):
        load_file(tmp_path / "text.mp3")
    sf.write(tmp_path / "full.wav", _tone(SR), SR)
    raw = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:30])
    with pytest.raises(AudioError, match="cut.wav"):
        load_file(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match="directory"):
        load_file(tmp_path)


def test_resampler_rejects_aliases_and_keeps_passband():
    x = np.sin(2 * np.pi * 10000 * np.arange(48000) / 48000)  # above the 8 kHz Nyquist of 16 kHz
    assert np.abs(resample(x, 48000, 16000)[200:-200]).max() < 1e-3
    y = resample(np.sin(2 * np.pi * 2000 * np.arange(44100) / 44100), 44100, 16000)
    assert np.abs(y[200:-200]).max() == pytest.approx(1.0, abs=0.01)


def test_int16_wav_at_16k_is_read_bit_exactly(tmp_path):
    pcm = np.random.default_rng(3).integers(-32768, 32767, 16000, dtype=np.int16)
    sf.write(tmp_path / "x.wav", pcm, SR, subtype="PCM_16")
    assert np.array_equal(load_file(tmp_path / "x.wav"), pcm)


def test_resampler_is_integer_and_streams_bit_exactly():
    from device.audio import StreamResampler, resample_pcm16
    pcm = np.random.default_rng(5).integers(-20000, 20000, 44100, dtype=np.int16)
    batch = resample_pcm16(pcm, 44100, 16000)
    assert batch.dtype == np.int16 and len(batch) == 16000
    r = StreamResampler(44100, 16000)
    parts, pos = [], 0
    for n in np.random.default_rng(6).integers(1, 3000, 100):
        parts.append(r.process_pcm16(pcm[pos:pos + n]))
        pos += n
    streamed = np.concatenate(parts)
    assert np.array_equal(streamed, batch[:len(streamed)]) and len(streamed) > 15900
