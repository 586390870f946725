"""Online, causal beat tracking on the integer log-Mel (100 hops per second).

Per hop, from past audio only:

1. **Onset strength**: each band's Q7.8 dB becomes a compressed magnitude log(1 + g a),
   a = amplitude relative to a running level (the loudest band, `LEVEL_S`), g = `ONSET_GAIN`
   (so a rise out of near-silence weighs little, a loud hit much); the half-wave-rectified
   flux of that, averaged over bands, is normalized causally: minus a running mean,
   divided by a running standard deviation (exponential, `ONSET_MEAN_S`, `ONSET_SD_S`).
2. **Tempo**: an exponentially weighted autocorrelation of the onset strength, updated
   every hop (time constant `cfg.tempo_window_s / 3`, so 95 % of its weight lies inside
   the window), read every `TEMPO_EVERY` hops through a 4-harmonic comb (a lag gets the
   support of its multiples), weighted by a log-Gaussian tempo prior (`PRIOR_BPM`,
   `PRIOR_OCTAVES`, which settles the octave), refined by parabolic interpolation. A new
   tempo replaces the current one only when it scores `TEMPO_SWITCH` better (hysteresis);
   otherwise the peak near the current tempo is followed (drift). A second autocorrelation
   with a 1 s memory detects tempo changes (`FAST_*`): when it steadily prefers another
   tempo by a wide margin, the tracker jumps there and rebuilds its beat score.
3. **Beat phase**: a cumulative beat score (Ellis' dynamic programme run forward, as in
   Stark's BTrack): score(t) = (1 - a) onset(t) + a max_v W(v) score(t - v), v in [P/2, 2P],
   W a log-Gaussian around the beat period P. Half a period after each beat the score is
   projected one period into the future (no onsets assumed) and the next beat is placed
   at its maximum, weighted by a Gaussian around "last beat + P". Beats are therefore
   predicted before they happen and raised in the hop that contains them, corrected by
   the onset detector's latency (`LATENCY_HOPS`).
4. **Metre and bar phase**: at each beat a 40-band accent vector (the compressed band
   magnitudes averaged over the hops around the beat) is kept; running mean distances
   between beats 3 apart and 4 apart decide 3/4 vs 4/4 (a bar repeats, so same-position
   beats look alike), with hysteresis. The downbeat is the bar position whose bass (Mel
   bands below ~200 Hz) is loudest, switched only for a `DOWNBEAT_SWITCH_DB` margin.

`BeatTracker.process(mel (k, n_mels) int16) -> BeatFrames` (k hops), or `step(frame)` per
hop. The trainer runs the same object over a whole file (`device.features.extract`), so
offline = online. Constants below were tuned on synthesized drums and the 33 Music-to-Dance
songs (agreement with madmom's online tracker, see docs/bench/beat.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from device.contract import DEFAULT_FEATURES, FeatureConfig

log = logging.getLogger(__name__)

LEVEL_S = 2.0            # running level (peak band, dB) the magnitudes are taken relative to
ONSET_GAIN = 100.0       # log(1 + 100 a): 40 dB of range above the compression knee at -40 dB re level
ONSET_MEAN_S = 1.0       # running mean of the flux subtracted from it (detrending)
ONSET_SD_S = 3.0         # running standard deviation it is divided by (level invariance)
ONSET_SD_FLOOR = 0.05    # in flux units, so digital silence does not divide by zero
ONSET_MAX = 50.0         # normalized onset clipped here
COMB_WEIGHTS = (1.0, 0.5, 1 / 3, 0.25)  # comb: a lag L is scored on L, 2L, 3L, 4L with these weights
N_HARMONICS = len(COMB_WEIGHTS)
ACF_TAU_FRACTION = 1 / 3  # autocorrelation time constant = tempo_window_s / 3 (95 % of the weight inside)
TEMPO_EVERY = 10         # hops between tempo read-outs (0.1 s)
TEMPO_WARMUP_S = 2.5     # no tempo (bpm 0, no beats) before this much audio
PRIOR_BPM = 110.0        # centre of the log-Gaussian tempo prior (ballroom/pop median)
PRIOR_OCTAVES = 0.8      # its standard deviation in octaves
FAST_TAU_S = 1.0         # memory of the tempo-change detector's autocorrelation (seconds)
FAST_MARGIN = 0.6        # it must score 60 % above the current tempo ...
FAST_VOTES = 5           # ... at 5 read-outs in a row (0.5 s) to force a tempo change
RESCORE_ON_JUMP = True   # rebuild the cumulative score when the tempo jumps
TEMPO_SWITCH = 0.10      # a different tempo must score 10 % better than the current one
TEMPO_FOLLOW = 0.05      # the current tempo follows its peak within +-5 %
CUM_ALPHA = 0.8          # weight of the past in the cumulative beat score (0.9 in BTrack; 0.8 tracked the songs better)
CUM_TIGHTNESS = 5.0      # width of the log-Gaussian transition window (BTrack's value)
LATENCY_HOPS = 1         # onset peaks lag the sound by one 10 ms hop; measured on synthesized drums
METER_MIN_BEATS = 12     # beats before a metre is declared
METER_SMOOTH = 0.95      # per-beat decay of the 3- vs 4-apart distance averages
METER_HYSTERESIS = 0.03  # relative distance margin to switch metre
ACCENT_LOW_BANDS = 4     # Mel bands 0..3 (30 - ~200 Hz): their peak level at a beat is its downbeat accent
DOWNBEAT_SWITCH_DB = 1.0 # another bar position must be 1 dB louder in the bass to become the downbeat
ACCENT_SMOOTH = 0.8      # per-visit decay of each bar position's accent average
ACCENT_PRE, ACCENT_POST = 3, 5  # hops around a beat averaged into its accent vector


@dataclasses.dataclass
class BeatFrames:
    """Beat state per hop (arrays of length k) and the beats raised in these hops."""

    bpm: np.ndarray           # (k,) float32, 0 while unknown
    phase: np.ndarray         # (k,) float32 in [0, 1): 0 at a beat
    bar_phase: np.ndarray     # (k,) float32 in [0, 1): 0 at a downbeat
    meter: np.ndarray         # (k,) int8: 3, 4, or 0 while unknown
    onset: np.ndarray         # (k,) float32 normalized onset strength in [0, ONSET_MAX]
    is_beat: np.ndarray       # (k,) bool: a beat falls in this hop
    next_beat_in: np.ndarray  # (k,) float32 seconds from the end of this hop to the next predicted beat
    beat_times: np.ndarray    # (n_beats,) float64 seconds of the beats raised in these hops


class BeatTracker:
    """Causal beat, tempo, metre and bar tracker: setup in __init__, `process`, `reset`."""

    def __init__(self, cfg: FeatureConfig = DEFAULT_FEATURES):
        self.cfg = cfg
        fr = cfg.frame_rate_hz  # 100 hops per second
        self.fr = fr
        self.min_lag = int(math.floor(60.0 * fr / cfg.max_bpm))  # 30 hops = 200 BPM
        self.max_lag = int(math.ceil(60.0 * fr / cfg.min_bpm))   # 100 hops = 60 BPM
        self.acf_len = N_HARMONICS * self.max_lag + N_HARMONICS  # 404: comb reach incl. tolerance
        self.acf_tau = cfg.tempo_window_s * ACF_TAU_FRACTION  # seconds
        self.acf_decay = math.exp(-1.0 / (self.acf_tau * fr))
        self.fast_decay = math.exp(-1.0 / (FAST_TAU_S * fr))
        self.decay2 = np.array([[self.acf_decay], [self.fast_decay]])  # (2, 1)
        self.log2_gain = math.log2(ONSET_GAIN)
        self.db_to_log2 = math.log2(10) / 20  # dB of amplitude -> log2 amplitude
        self.low_scale = 1.0 / (ACCENT_LOW_BANDS * (1 << cfg.log_frac_bits))  # sum of Q7.8 -> mean dB
        self.mean_a = 1.0 / (ONSET_MEAN_S * fr)
        self.sd_a = 1.0 / (ONSET_SD_S * fr)
        self.level_a = 1.0 / (LEVEL_S * fr)
        # Q7.8 dB -> log2 amplitude: value / 256 dB, / 20 dB per decade, * log2(10)
        self.q78_to_log2 = math.log2(10) / (20.0 * 2 ** cfg.log_frac_bits)
        self.warmup = int(round(TEMPO_WARMUP_S * fr))
        lags = np.arange(self.min_lag, self.max_lag + 1)  # (n_lags,)
        self.lags = lags
        # Comb read-out: for harmonic k the max over lags k*L-(k-1) .. k*L+(k-1).
        self.comb_idx = [k * lags[:, None] + np.arange(-(k - 1), k)[None, :] for k in range(1, N_HARMONICS + 1)]
        bpm = 60.0 * fr / lags
        self.log_prior = -0.5 * (np.log2(bpm / PRIOR_BPM) / PRIOR_OCTAVES) ** 2  # (n_lags,)
        self.cum_len = 2 * self.max_lag + 2  # cumulative-score history reaches back 2 periods
        self.hist_len = self.acf_len + 1
        self.flux_len = 64  # hops of band levels kept for the beats' accent vectors
        self.reset()

    def reset(self) -> None:
        cfg = self.cfg
        self.t = -1  # index of the last processed hop
        self.prev = None  # previous log-Mel frame, int32 (n_mels,)
        self.o_mean = 0.0
        self.o_var = 0.0
        self.c_mean = 0.0
        self.n_seen = 0
        # Doubled ring buffers: value i sits at i % R and i % R + R, so the last R values
        # are one contiguous slice buf[i % R + 1 : i % R + R + 1] (oldest .. newest).
        self.hist = np.zeros(2 * self.hist_len)  # centred onset for the autocorrelation
        self.cum = np.zeros(2 * self.cum_len)    # cumulative beat score
        self.ons = np.zeros(2 * self.cum_len)    # normalized onset, same indexing
        self.comp_hist = np.zeros((2 * self.flux_len, cfg.n_mels))  # compressed magnitudes
        self.low = np.zeros(2 * self.flux_len)  # mean dB of the lowest Mel bands per hop
        self.level_db = 0.0
        # exponentially weighted autocorrelations: long memory (tempo) and short (tempo changes)
        self.acf2 = np.zeros((2, self.acf_len + 1))
        self.acf, self.acf_fast = self.acf2[0], self.acf2[1]  # views
        self.fast_votes = 0
        self.period = 0.0  # beat period in hops, 0 = unknown
        self.cur_score = 0.0
        self._set_window(0.0)
        self.last_beat = None  # internal hop index of the last beat raised
        self.next_beat = None  # internal hop index of the next predicted beat
        self.predict_at = None  # hop at which the next beat is predicted
        self.beat_count = 0
        self.pending_accents: list[tuple[int, int]] = []  # (beat number, beat hop) awaiting their accent
        self.accents: list[np.ndarray] = []  # last few accent vectors (n_mels,)
        self.dist = {3: 0.0, 4: 0.0}
        self.n_dist = 0
        self.meter = 0
        self.pos_accent = np.zeros(12)  # bass level (dB) per beat number mod 12 (lcm of 3 and 4)
        self.pos_seen = np.zeros(12, bool)
        self.downbeat = 0  # beat number mod meter that is the downbeat
        self.bar_beats = 4

    # -- set-up of the period-dependent transition window ------------------------------
    def _set_window(self, period: float) -> None:
        if period <= 0:
            self.v_lo = self.v_hi = 0
            self.w1 = np.zeros(0)
            return
        self.v_lo = max(1, int(round(period / 2)))
        self.v_hi = min(self.cum_len - 1, int(round(2 * period)))
        v = np.arange(self.v_hi, self.v_lo - 1, -1)  # oldest .. newest
        self.w1 = np.exp(-0.5 * (CUM_TIGHTNESS * np.log(v / period)) ** 2)

    # -- per hop -------------------------------------------------------------------------
    def process(self, mel: np.ndarray) -> BeatFrames:
        mel = np.asarray(mel)
        assert mel.ndim == 2 and mel.shape[1] == self.cfg.n_mels, f"mel must be (k, {self.cfg.n_mels}), got {mel.shape}"
        k = mel.shape[0]
        bpm = np.zeros(k, np.float32)
        phase = np.zeros(k, np.float32)
        bar_phase = np.zeros(k, np.float32)
        meter = np.zeros(k, np.int8)
        onset = np.zeros(k, np.float32)
        is_beat = np.zeros(k, bool)
        next_in = np.zeros(k, np.float32)
        beats = []
        m64 = mel.astype(np.float64)
        for j in range(k):
            bpm[j], phase[j], bar_phase[j], meter[j], onset[j], beat, next_in[j] = self.step(m64[j])
            if beat is not None:
                is_beat[j] = True
                beats.append(beat)
        return BeatFrames(bpm, phase, bar_phase, meter, onset, is_beat, next_in, np.asarray(beats, np.float64))

    def step(self, frame: np.ndarray) -> tuple[float, float, float, int, float, float | None, float]:
        """One hop, frame (n_mels,) float64 holding the Q7.8 integers: (bpm, phase, bar_phase,
        meter, onset, time of the beat raised in this hop or None, next_beat_in)."""
        o, beat = self._hop(frame)
        bpm, ph, bar, meter, nxt = self._state()
        return bpm, ph, bar, meter, o, beat, nxt

    def _hop(self, frame: np.ndarray) -> tuple[float, float | None]:
        self.t += 1
        t = self.t
        # 1. onset strength: flux of log(1 + g * magnitude re the running level)
        peak_db = int(frame.max()) / 256.0
        if self.prev is None:
            self.level_db = peak_db
        self.level_db += self.level_a * (peak_db - self.level_db)
        # g * amplitude re level = 2 ** (q78 * q78_to_log2 - level_db * log2(10) / 20 + log2(g))
        comp = np.log1p(np.exp2(frame * self.q78_to_log2 + (self.log2_gain - self.level_db * self.db_to_log2)))  # (n_mels,)
        if self.prev is None:
            diff = np.zeros_like(comp)
        else:
            diff = np.maximum(comp - self.prev, 0.0)  # (n_mels,)
        self.prev = comp
        fi = t % self.flux_len
        self.comp_hist[fi] = comp
        self.comp_hist[fi + self.flux_len] = comp
        low = float(frame[:ACCENT_LOW_BANDS].sum()) * self.low_scale  # mean dB of the low bands
        self.low[fi] = low
        self.low[fi + self.flux_len] = low
        raw = float(diff.sum()) / self.cfg.n_mels
        if self.n_seen == 0:
            self.o_mean = raw
        self.n_seen += 1
        dev = raw - self.o_mean
        self.o_mean += self.mean_a * dev
        self.o_var += self.sd_a * (dev * dev - self.o_var)
        o = min(ONSET_MAX, max(0.0, dev) / (math.sqrt(self.o_var) + ONSET_SD_FLOOR))
        # 2. autocorrelation of the centred onset
        c = o - self.c_mean
        self.c_mean += self.mean_a * (o - self.c_mean)
        hi = t % self.hist_len
        self.hist[hi] = c
        self.hist[hi + self.hist_len] = c
        recent = self.hist[hi + 1: hi + self.hist_len + 1]  # (acf_len + 1,) oldest .. newest
        self.acf2 *= self.decay2
        self.acf2 += c * recent[::-1]  # acf[L] += c(t) c(t - L) in both memories
        if t >= self.warmup and t % TEMPO_EVERY == 0:
            self._update_tempo()
        # 3. cumulative beat score
        ci = t % self.cum_len
        if self.period > 0:
            past = self.cum[ci + self.cum_len - self.v_hi: ci + self.cum_len - self.v_lo + 1]
            score = (1 - CUM_ALPHA) * o + CUM_ALPHA * float((past * self.w1).max())
        else:
            score = o
        self.cum[ci] = score
        self.cum[ci + self.cum_len] = score
        self.ons[ci] = o
        self.ons[ci + self.cum_len] = o
        beat_time = None
        if self.period > 0:
            if self.next_beat is None and (self.predict_at is None or t >= self.predict_at):
                self._predict_next()
            if self.next_beat is not None and t >= self.next_beat - LATENCY_HOPS:
                beat_time = self._raise_beat()
        self._update_accents()
        return o, beat_time

    def _score(self, a: np.ndarray) -> np.ndarray | None:
        """Log comb score + log prior per candidate lag, None while the autocorrelation is empty."""
        s = np.zeros(len(self.lags))
        for w, idx in zip(COMB_WEIGHTS, self.comb_idx):
            s += w * a[idx].max(axis=1)
        peak = float(s.max())
        if peak <= 0:
            return None
        return np.log(np.maximum(s / peak, 1e-6)) + self.log_prior  # (n_lags,)

    def _near(self, s: np.ndarray, period: float) -> int:
        lo = np.searchsorted(self.lags, period * (1 - TEMPO_FOLLOW))
        hi = np.searchsorted(self.lags, period * (1 + TEMPO_FOLLOW), side="right")
        hi = max(hi, lo + 1)
        return lo + int(np.argmax(s[lo:hi]))

    def _update_tempo(self) -> None:
        s = self._score(self.acf)
        if s is None:
            return
        best = int(np.argmax(s))
        if self.period > 0:
            near = self._near(s, self.period)
            if s[best] < s[near] + math.log1p(TEMPO_SWITCH):
                best = near
            # Tempo change: the short-memory autocorrelation has clearly and steadily moved
            # elsewhere; take its tempo and let the long one start over from it.
            sf = self._score(self.acf_fast)
            if sf is not None:
                fb = int(np.argmax(sf))
                moved = abs(self.lags[fb] - self.lags[best]) > TEMPO_FOLLOW * self.lags[best]
                if moved and sf[fb] > sf[self._near(sf, self.lags[best])] + math.log1p(FAST_MARGIN):
                    self.fast_votes += 1
                else:
                    self.fast_votes = 0
                if self.fast_votes >= FAST_VOTES:
                    best, s = fb, sf
                    self.acf[:] = self.acf_fast * (self.acf_tau / FAST_TAU_S)
                    self.fast_votes = 0
        period = float(self.lags[best])
        if 0 < best < len(s) - 1:  # parabolic interpolation of the peak
            y0, y1, y2 = s[best - 1], s[best], s[best + 1]
            den = y0 - 2 * y1 + y2
            if den < 0:
                period += 0.5 * (y0 - y2) / den
        jump = self.period > 0 and abs(period - self.period) > TEMPO_FOLLOW * self.period
        if self.period <= 0:
            log.debug("hop %d: first tempo %.1f BPM", self.t, 60 * self.fr / period)
        elif jump:
            log.debug("hop %d: tempo %.1f -> %.1f BPM", self.t, 60 * self.fr / self.period, 60 * self.fr / period)
        self.period = period
        self._set_window(period)
        if jump and RESCORE_ON_JUMP:
            self._rescore()

    def _rescore(self) -> None:
        """After a tempo jump, rebuild the cumulative score of the last 2 periods with the new
        period, so the old tempo's phase does not linger (it would lock to off-beats)."""
        n, ci = self.cum_len, self.t % self.cum_len
        ons = self.ons[ci + 1: ci + n + 1]  # oldest .. now
        buf = ons.copy()
        for x in range(self.v_hi, n):
            buf[x] = (1 - CUM_ALPHA) * ons[x] + CUM_ALPHA * float(np.max(buf[x - self.v_hi: x - self.v_lo + 1] * self.w1))
        idx = np.arange(self.t - n + 1, self.t + 1) % n  # ring positions of those hops
        self.cum[idx] = buf
        self.cum[idx + n] = buf

    def _predict_next(self) -> None:
        """Project the cumulative score one period ahead and put the next beat at its peak."""
        t, p = self.t, self.period
        n_future = int(math.ceil(p))
        ci = t % self.cum_len
        buf = np.empty(self.cum_len + n_future)
        buf[:self.cum_len] = self.cum[ci + 1: ci + self.cum_len + 1]  # oldest .. now
        now = self.cum_len - 1
        for i in range(1, n_future + 1):
            x = now + i
            buf[x] = CUM_ALPHA * float(np.max(buf[x - self.v_hi: x - self.v_lo + 1] * self.w1))
        future = buf[now + 1:]  # (n_future,) hops t+1 .. t+n_future
        expected = (self.last_beat + p - t) if self.last_beat is not None else p / 2
        d = np.arange(1, n_future + 1)
        w2 = np.exp(-0.5 * ((d - expected) / (p / 2)) ** 2)
        self.next_beat = t + 1 + int(np.argmax(future * w2))

    def _raise_beat(self) -> float:
        b = self.next_beat
        self.last_beat = b
        self.next_beat = None
        self.predict_at = b + int(round(self.period / 2))
        self.pending_accents.append((self.beat_count, b))
        self.beat_count += 1
        return (b - LATENCY_HOPS + 1) / self.fr  # end of the hop the beat is raised in

    def _update_accents(self) -> None:
        t = self.t
        while self.pending_accents and t >= self.pending_accents[0][1] + ACCENT_POST:
            n, b = self.pending_accents.pop(0)
            if b - ACCENT_PRE <= t - self.flux_len:
                continue
            fi = t % self.flux_len
            lo = self.flux_len - 1 - (t - (b - ACCENT_PRE))  # window in the oldest .. now slices
            hi = self.flux_len - 1 - (t - (b + ACCENT_POST)) + 1
            vec = self.comp_hist[fi + 1: fi + self.flux_len + 1][lo:hi].mean(axis=0)  # (n_mels,)
            bass = float(self.low[fi + 1: fi + self.flux_len + 1][lo:hi].max())  # dB
            self._meter_update(n, vec, bass)

    def _meter_update(self, n: int, vec: np.ndarray, bass: float) -> None:
        self.accents.append(vec)
        if len(self.accents) > 5:
            self.accents.pop(0)
        if len(self.accents) == 5:
            norm = float(np.abs(vec).sum()) + 1e-6
            for lag in (3, 4):
                d = float(np.abs(vec - self.accents[-1 - lag]).sum()) / norm
                self.dist[lag] = METER_SMOOTH * self.dist[lag] + (1 - METER_SMOOTH) * d
            self.n_dist += 1
        if self.pos_seen[n % 12]:
            self.pos_accent[n % 12] = ACCENT_SMOOTH * self.pos_accent[n % 12] + (1 - ACCENT_SMOOTH) * bass
        else:
            self.pos_accent[n % 12] = bass
            self.pos_seen[n % 12] = True
        if self.n_dist >= METER_MIN_BEATS:
            d3, d4 = self.dist[3], self.dist[4]
            rel = (d4 - d3) / (d3 + d4 + 1e-9)  # > 0: beats 3 apart are more alike -> 3/4
            if self.meter == 0:
                self.meter = 3 if rel > 0 else 4
            elif self.meter == 4 and rel > METER_HYSTERESIS:
                self.meter = 3
            elif self.meter == 3 and rel < -METER_HYSTERESIS:
                self.meter = 4
        m = self.meter or 4
        strength = [self.pos_accent[q::m].mean() for q in range(m)]
        best = int(np.argmax(strength))
        cur = self.downbeat % m
        if m != self.bar_beats or strength[best] > strength[cur] + DOWNBEAT_SWITCH_DB:
            self.downbeat = best
        self.bar_beats = m

    def _state(self) -> tuple[float, float, float, int, float]:
        """bpm, phase, bar_phase, meter, next_beat_in (s) after the current hop."""
        if self.period <= 0:
            return 0.0, 0.0, 0.0, 0, 0.0
        t = self.t + LATENCY_HOPS  # the detector's clock (hop indices the beats live on)
        p = self.period
        nxt = self.next_beat if self.next_beat is not None else (
            (self.last_beat + p) if self.last_beat is not None else t + p)
        nxt = max(float(nxt), t + 1e-3)
        if self.last_beat is None:
            ph = 0.0
        else:
            ph = (t - self.last_beat) / max(nxt - self.last_beat, 1.0)
            ph = min(max(ph, 0.0), 0.999)
        m = self.bar_beats
        in_bar = 0
        if self.beat_count:
            in_bar = ((self.beat_count - 1) - self.downbeat) % m
        bar = (in_bar + ph) / m
        return 60.0 * self.fr / p, ph, bar, self.meter, (nxt - t) / self.fr


def track(mel: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> BeatFrames:
    """Run a fresh tracker over a whole (N, n_mels) log-Mel: the same causal code."""
    return BeatTracker(cfg).process(mel)
