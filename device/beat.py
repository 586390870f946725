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

`BeatTracker.process(mel (k, n_mels) int16) -> BeatFrames` (k hops), or `advance(mel)` and
`state()` when only the state after the last hop is wanted (the feature framing). Step 1 runs
vectorised over blocks of up to `BLOCK_HOPS` hops (it depends on the audio only), steps 2-4
hop by hop. The trainer runs the same object over a whole file (`device.features.extract`), so
offline = online. Constants below were tuned on synthesized drums and the 33 Music-to-Dance
songs (agreement with madmom's online tracker, see docs/bench/beat.md).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
BLOCK_HOPS = 16          # hops whose onset strengths are computed together (speed only; rings keep this slack)


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
        self.hist_len = self.acf_len + 1  # onsets one autocorrelation update reads
        self.flux_len = 64  # hops of band levels kept for the beats' accent vectors
        # Ring sizes: the hops a block writes ahead of the hop being processed must not overwrite
        # what that hop still reads.
        self.hist_ring = self.hist_len + BLOCK_HOPS
        self.flux_ring = self.flux_len + BLOCK_HOPS
        self.decay_full = np.repeat(self.decay2, self.acf_len + 1, axis=1)  # (2, acf_len + 1)
        # Comb read-out of both autocorrelations (flattened, row r at offset r * (acf_len + 1)) in one
        # gather: every harmonic's lag range padded to the widest by repeating its last lag (a max
        # does not change), shape (2 * N_HARMONICS - 1, N_HARMONICS, 2, n_lags); the max is over axis 0.
        width = 2 * N_HARMONICS - 1
        padded = [np.pad(idx, ((0, 0), (0, width - idx.shape[1])), mode="edge") for idx in self.comb_idx]
        comb = np.stack([idx.T for idx in padded], axis=1)  # (width, N_HARMONICS, n_lags)
        self.comb_flat = comb[:, :, None] + (self.acf_len + 1) * np.arange(2)[None, None, :, None]
        n_lags = len(lags)
        self.comb_w = np.broadcast_to(np.array(COMB_WEIGHTS)[:, None, None], (N_HARMONICS, 2, n_lags)).copy()
        self.log_prior2 = np.tile(self.log_prior, (2, 1))  # (2, n_lags)
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
        self.cum = np.zeros(2 * self.cum_len)    # cumulative beat score
        self.ons = np.zeros(2 * self.cum_len)    # normalized onset, same indexing
        self.comp_hist = np.zeros((2 * self.flux_ring, cfg.n_mels))  # compressed magnitudes
        self.low = np.zeros(2 * self.flux_ring)  # mean dB of the lowest Mel bands per hop
        # Centred onset for the autocorrelation, newest first: value i at -i % R and -i % R + R,
        # so hop i's window c(i), c(i - 1), .. c(i - acf_len) is one forward slice.
        self.hist = np.zeros(2 * self.hist_ring)
        self.level_db = 0.0
        # exponentially weighted autocorrelations: long memory (tempo) and short (tempo changes)
        self.acf2 = np.zeros((2, self.acf_len + 1))
        self._views()
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

    def _views(self) -> None:
        self.hist_windows = sliding_window_view(self.hist, self.hist_len)  # (2R - acf_len, acf_len + 1)
        self.acf, self.acf_fast = self.acf2[0], self.acf2[1]
        self.acf_flat = self.acf2.reshape(-1)

    def __setstate__(self, state: dict) -> None:  # a copy or unpickled tracker: views into its own arrays
        self.__dict__.update(state)
        self._views()

    # -- set-up of the period-dependent transition window ------------------------------
    def _set_window(self, period: float) -> None:
        if period <= 0:
            self.v_lo = self.v_hi = 0
            self.w1 = np.zeros(0)
            self.w_tmp = np.zeros(0)
            return
        self.v_lo = max(1, int(round(period / 2)))
        self.v_hi = min(self.cum_len - 1, int(round(2 * period)))
        v = np.arange(self.v_hi, self.v_lo - 1, -1)  # oldest .. newest
        self.w1 = np.exp(-0.5 * (CUM_TIGHTNESS * np.log(v / period)) ** 2)
        self.w_tmp = np.empty_like(self.w1)

    # -- per block of hops -----------------------------------------------------------------
    def process(self, mel: np.ndarray) -> BeatFrames:
        mel = np.asarray(mel)
        assert mel.ndim == 2 and mel.shape[1] == self.cfg.n_mels, f"mel must be (k, {self.cfg.n_mels}), got {mel.shape}"
        k = mel.shape[0]
        onset = np.zeros(k, np.float32)
        is_beat = np.zeros(k, bool)
        beats, states = [], []
        m64 = mel.astype(np.float64)
        for s in range(0, k, BLOCK_HOPS):
            ons, raised = self._block(m64[s: s + BLOCK_HOPS], states)
            onset[s: s + len(ons)] = ons
            for j, beat in raised:
                is_beat[s + j] = True
                beats.append(beat)
        st = np.array(states, np.float64).reshape(k, 5)  # bpm, phase, bar_phase, meter, next_beat_in
        return BeatFrames(st[:, 0].astype(np.float32), st[:, 1].astype(np.float32), st[:, 2].astype(np.float32),
                          st[:, 3].astype(np.int8), onset, is_beat, st[:, 4].astype(np.float32),
                          np.asarray(beats, np.float64))

    def advance(self, mel: np.ndarray) -> tuple[list[float], list[float]]:
        """Run k hops, mel (k, n_mels) holding the Q7.8 integers (any dtype): (the k normalized onset
        strengths, the times of the beats raised in them). `state()` is the state after the last hop."""
        m64 = np.asarray(mel, np.float64)
        onsets, beats = [], []
        for s in range(0, len(m64), BLOCK_HOPS):
            ons, raised = self._block(m64[s: s + BLOCK_HOPS], None)
            onsets += ons
            beats += [b for _, b in raised]
        return onsets, beats

    def step(self, frame: np.ndarray) -> tuple[float, float, float, int, float, float | None, float]:
        """One hop, frame (n_mels,) holding the Q7.8 integers: (bpm, phase, bar_phase, meter, onset,
        time of the beat raised in this hop or None, next_beat_in)."""
        ons, raised = self._block(np.asarray(frame, np.float64)[None], None)
        bpm, ph, bar, meter, nxt = self.state()
        return bpm, ph, bar, meter, ons[0], raised[0][1] if raised else None, nxt

    def _block(self, m64: np.ndarray, states: list | None) -> tuple[list[float], list[tuple[int, float]]]:
        """Hops t + 1 .. t + k, m64 (k <= BLOCK_HOPS, n_mels) float64: (onsets, [(hop in block, beat time)]);
        appends each hop's state() to `states` unless None."""
        k = len(m64)
        assert k <= BLOCK_HOPS
        t0 = self.t + 1
        o, c = self._onsets(m64)  # (k,) lists
        # 2. autocorrelation of the centred onset: window products of all k hops at once; the updates
        # stay per hop (a tempo read-out between them may reset the long memory).
        _ring_put(self.hist, self.hist_ring, -(t0 + k - 1), c[::-1])  # newest first
        last = -(t0 + k - 1) % self.hist_ring  # hop t0 + j's window starts at last + (k - 1 - j)
        win = self.hist_windows[last: last + k][::-1]  # (k, acf_len + 1) newest .. oldest
        prod = np.asarray(c)[:, None, None] * win[:, None, :]  # (k, 2, acf_len + 1): c(t) c(t - L), both memories
        raised = []
        acf2, decay = self.acf2, self.decay_full
        for j in range(k):
            self.t = t = t0 + j
            acf2 *= decay
            acf2 += prod[j]  # acf[L] += c(t) c(t - L)
            if t >= self.warmup and t % TEMPO_EVERY == 0:
                self._update_tempo()
            beat_time = self._beat_hop(t, o[j])
            if beat_time is not None:
                raised.append((j, beat_time))
            if self.pending_accents and t >= self.pending_accents[0][1] + ACCENT_POST:
                self._update_accents()
            if states is not None:
                states.append(self.state())
        return o, raised

    def _onsets(self, m64: np.ndarray) -> tuple[list[float], list[float]]:
        """1. onset strength of k hops: flux of log(1 + g * magnitude re the running level).
        Returns the normalized onsets and their centred values; stores the compressed magnitudes
        and the low-band levels for the accent vectors."""
        k = len(m64)
        t0 = self.t + 1
        first = self.prev is None
        level, offs = self.level_db, np.empty(k)
        for j, peak in enumerate(m64.max(axis=1).tolist()):
            peak_db = int(peak) / 256.0
            if first and j == 0:
                level = peak_db
            level += self.level_a * (peak_db - level)
            offs[j] = self.log2_gain - level * self.db_to_log2
        self.level_db = level
        # g * amplitude re level = 2 ** (q78 * q78_to_log2 - level_db * log2(10) / 20 + log2(g))
        ext = np.empty((k + 1, m64.shape[1]))  # the previous hop's magnitudes, then this block's
        comp = ext[1:]
        np.multiply(m64, self.q78_to_log2, out=comp)
        comp += offs[:, None]
        np.exp2(comp, out=comp)
        np.log1p(comp, out=comp)  # (k, n_mels)
        if first:
            ext[0] = comp[0]  # no flux at the first hop
        else:
            ext[0] = self.prev
        diff = np.subtract(comp, ext[:-1])
        np.maximum(diff, 0.0, out=diff)  # (k, n_mels)
        self.prev = comp[-1]
        raw = (diff.sum(axis=1) / self.cfg.n_mels).tolist()
        _ring_put(self.comp_hist, self.flux_ring, t0, comp)
        _ring_put(self.low, self.flux_ring, t0, m64[:, :ACCENT_LOW_BANDS].sum(axis=1) * self.low_scale)  # mean dB
        onsets, centred = [], []
        mean_a, sd_a = self.mean_a, self.sd_a
        o_mean, o_var, c_mean = self.o_mean, self.o_var, self.c_mean
        for r in raw:
            if self.n_seen == 0:
                o_mean = r
            self.n_seen += 1
            dev = r - o_mean
            o_mean += mean_a * dev
            o_var += sd_a * (dev * dev - o_var)
            o = min(ONSET_MAX, max(0.0, dev) / (math.sqrt(o_var) + ONSET_SD_FLOOR))
            centred.append(o - c_mean)
            c_mean += mean_a * (o - c_mean)
            onsets.append(o)
        self.o_mean, self.o_var, self.c_mean = o_mean, o_var, c_mean
        return onsets, centred

    def _beat_hop(self, t: int, o: float) -> float | None:
        """3. cumulative beat score of hop t; predicts and raises beats: the time of a beat raised now, or None."""
        ci = t % self.cum_len
        if self.period > 0:
            past = self.cum[ci + self.cum_len - self.v_hi: ci + self.cum_len - self.v_lo + 1]
            np.multiply(past, self.w1, out=self.w_tmp)
            score = (1 - CUM_ALPHA) * o + CUM_ALPHA * float(np.maximum.reduce(self.w_tmp))
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
        return beat_time

    def _scores(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Log comb score + log prior per candidate lag (n_lags,) of the long and the short
        autocorrelation; None for one that is still empty."""
        peaks = np.maximum.reduce(np.take(self.acf_flat, self.comb_flat), axis=0)  # (N_HARMONICS, 2, n_lags)
        peaks *= self.comb_w
        s = np.zeros(peaks.shape[1:])  # (2, n_lags)
        for h in range(N_HARMONICS):
            s += peaks[h]  # sum of w * max over each harmonic's lags, in harmonic order
        top = s.max(axis=1).tolist()
        if min(top) > 0:
            s /= np.array(top)[:, None]
            np.maximum(s, 1e-6, out=s)
            np.log(s, out=s)
            s += self.log_prior2
            return s[0], s[1]
        return tuple(None if p <= 0 else np.log(np.maximum(row / p, 1e-6)) + self.log_prior
                     for row, p in zip(s, top))

    def _near(self, s: np.ndarray, period: float) -> int:
        # lags are the integers min_lag .. max_lag: index of the first lag >= x is ceil(x) - min_lag
        # (searchsorted left), of the first lag > x floor(x) + 1 - min_lag (right), clipped to 0 .. n_lags.
        n = len(self.lags)
        lo = min(max(math.ceil(period * (1 - TEMPO_FOLLOW)) - self.min_lag, 0), n)
        hi = min(max(math.floor(period * (1 + TEMPO_FOLLOW)) + 1 - self.min_lag, 0), n)
        hi = max(hi, lo + 1)
        return lo + int(np.argmax(s[lo:hi]))

    def _update_tempo(self) -> None:
        s, sf = self._scores()
        if s is None:
            return
        best = int(np.argmax(s))
        if self.period > 0:
            near = self._near(s, self.period)
            if s[best] < s[near] + math.log1p(TEMPO_SWITCH):
                best = near
            # Tempo change: the short-memory autocorrelation has clearly and steadily moved
            # elsewhere; take its tempo and let the long one start over from it.
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
        self._project(buf, self.v_hi, n, ons)
        idx = np.arange(self.t - n + 1, self.t + 1) % n  # ring positions of those hops
        self.cum[idx] = buf
        self.cum[idx + n] = buf

    def _project(self, buf: np.ndarray, x0: int, x1: int, ons: np.ndarray | None = None) -> None:
        """buf[x] = (1 - a) ons[x] + a max_v W(v) buf[x - v], v in [v_lo, v_hi], for x = x0 .. x1 - 1
        (no onset term when ons is None). Runs of v_lo hops read only earlier hops: one numpy step each."""
        win = sliding_window_view(buf, len(self.w1))  # row y: buf[y : y + v_hi - v_lo + 1]
        for x in range(x0, x1, self.v_lo):
            n = min(self.v_lo, x1 - x)
            best = (win[x - self.v_hi: x - self.v_hi + n] * self.w1).max(axis=1)  # (n,)
            if ons is None:
                buf[x: x + n] = CUM_ALPHA * best
            else:
                buf[x: x + n] = (1 - CUM_ALPHA) * ons[x: x + n] + CUM_ALPHA * best

    def _predict_next(self) -> None:
        """Project the cumulative score one period ahead and put the next beat at its peak."""
        t, p = self.t, self.period
        n_future = int(math.ceil(p))
        ci = t % self.cum_len
        buf = np.empty(self.cum_len + n_future)
        buf[:self.cum_len] = self.cum[ci + 1: ci + self.cum_len + 1]  # oldest .. now
        now = self.cum_len - 1
        self._project(buf, now + 1, now + n_future + 1)
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
            end = t % self.flux_ring + self.flux_ring + 1
            recent = slice(end - self.flux_len, end)  # the last flux_len hops, oldest .. now
            lo = self.flux_len - 1 - (t - (b - ACCENT_PRE))  # window in the oldest .. now slices
            hi = self.flux_len - 1 - (t - (b + ACCENT_POST)) + 1
            vec = self.comp_hist[recent][lo:hi].mean(axis=0)  # (n_mels,)
            bass = float(self.low[recent][lo:hi].max())  # dB
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

    def state(self) -> tuple[float, float, float, int, float]:
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


def _ring_put(buf: np.ndarray, ring: int, start: int, values: np.ndarray) -> None:
    """Store values[i] as entry start + i of a doubled ring buffer (entry j at j % ring and j % ring + ring)."""
    p = start % ring
    n = min(len(values), ring - p)
    buf[p: p + n] = values[:n]
    buf[p + ring: p + ring + n] = values[:n]
    if n < len(values):  # wrapped around
        rest = len(values) - n
        buf[:rest] = values[n:]
        buf[ring: ring + rest] = values[n:]


def track(mel: np.ndarray, cfg: FeatureConfig = DEFAULT_FEATURES) -> BeatFrames:
    """Run a fresh tracker over a whole (N, n_mels) log-Mel: the same causal code."""
    return BeatTracker(cfg).process(mel)
