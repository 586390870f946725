// The MQTT message schema v1 (docs/protocol.md) for the browser: one decoder for
// JSON and the 94-byte binary pose, validating exactly what device/protocol.py
// validates, so the page never draws a message the Python side would reject.
// Known difference: JavaScript cannot tell 1.0 from 1, so an integral float in an
// integer field passes here and fails in Python (the value is the same either way).
"use strict";

const EdgeProtocol = (() => {
  const SCHEMA_VERSION = 1;
  const TOPIC_ROOT = "edgedance/v1";
  const KINDS = ["pose", "beat", "status", "metrics", "cmd", "features"];
  const STATES = ["online", "paused", "stopped", "offline"];
  const COMMANDS = ["start", "stop", "pause", "select_bundle", "latency"];
  const MAX_PAYLOAD = 64 * 1024;
  const MAX_FEATURE_ROWS = 256; // offload: context + new frames in one features message
  const DEVICE_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const N_KEYPOINTS = 14;
  const BINARY_MAGIC = 0xed;
  const BINARY_SIZE = 94; // struct "<BBBBIdfffHHBBHh28h", layout in docs/protocol.md
  const Q15 = 32767; // keypoints and heading: value * 32767
  const PHASE_Q16 = 65536; // phases: phase * 2**16
  const utf8 = new TextDecoder("utf-8", { fatal: true });

  class ProtocolError extends Error {
    constructor(message) {
      super(message);
      this.name = "ProtocolError";
    }
  }

  const isObject = (x) => typeof x === "object" && x !== null && !Array.isArray(x);
  const show = (x) => {
    let s;
    try { s = JSON.stringify(x); } catch (e) { s = String(x); }
    return s === undefined ? "undefined" : s.slice(0, 40);
  };

  function parseTopic(t) {
    const parts = String(t).split("/");
    if (parts.length !== 4 || parts[0] + "/" + parts[1] !== TOPIC_ROOT || !KINDS.includes(parts[3])) {
      throw new ProtocolError(`topic ${show(t)}: expected ${TOPIC_ROOT}/<device_id>/<${KINDS.join("|")}>`);
    }
    if (!DEVICE_ID_RE.test(parts[2])) throw new ProtocolError(`topic ${show(t)}: bad device id ${show(parts[2])}`);
    return [parts[2], parts[3]];
  }

  function num(m, key, where, lo = -Infinity, hi = Infinity, integer = false) {
    if (!Object.prototype.hasOwnProperty.call(m, key)) throw new ProtocolError(`${where}: missing field '${key}'`);
    const x = m[key];
    if (typeof x !== "number" || (integer && Number.isFinite(x) && !Number.isInteger(x))) {
      throw new ProtocolError(`${where}: field '${key}' must be ${integer ? "an integer" : "a number"}, got ${show(x)}`);
    }
    if (!Number.isFinite(x)) throw new ProtocolError(`${where}: field '${key}' is not finite`);
    if (!(lo <= x && x <= hi)) throw new ProtocolError(`${where}: field '${key}' = ${x} outside [${lo}, ${hi}]`);
    return x;
  }

  function str(m, key, where, choices = null) {
    const x = m[key];
    if (typeof x !== "string") throw new ProtocolError(`${where}: field '${key}' must be a string, got ${show(x)}`);
    if (choices && !choices.includes(x)) throw new ProtocolError(`${where}: field '${key}' = ${show(x)} not one of ${choices}`);
    return x;
  }

  function validateBeat(b, where) {
    where = `${where} beat`;
    if (!isObject(b)) throw new ProtocolError(`${where}: field 'beat' must be an object`);
    num(b, "bpm", where, 0, 1000);
    num(b, "phase", where, 0, 1);
    num(b, "bar_phase", where, 0, 1);
    num(b, "meter", where, 0, 16, true);
    num(b, "onset", where, 0);
    num(b, "next_beat_in", where, 0, 60);
    if (typeof b.is_beat !== "boolean") throw new ProtocolError(`${where}: field 'is_beat' must be true or false`);
  }

  function validate(msg) {
    if (!isObject(msg)) throw new ProtocolError(`message must be an object, got ${Array.isArray(msg) ? "array" : typeof msg}`);
    if (msg.v !== SCHEMA_VERSION) throw new ProtocolError(`field 'v' is ${show(msg.v)}; this decoder speaks schema ${SCHEMA_VERSION}`);
    const kind = str(msg, "type", "message", KINDS);
    const where = `${kind} message`;
    const device = str(msg, "device", where);
    if (!DEVICE_ID_RE.test(device) && device !== "unknown") {
      throw new ProtocolError(`${where}: field 'device' = ${show(device)} is not a valid device id`);
    }
    num(msg, "seq", where, 0, 2 ** 63, true);
    num(msg, "t", where, 0);
    if (kind === "pose") {
      num(msg, "frame", where, 0, Infinity, true);
      num(msg, "t_audio", where, 0);
      num(msg, "t_capture", where, 0);
      num(msg, "fps", where, 1, 240);
      num(msg, "heading", where, -Math.PI - 1e-3, Math.PI + 1e-3);
      validateBeat(msg.beat, where);
      const kp = msg.kp;
      if (!Array.isArray(kp) || kp.length !== N_KEYPOINTS) throw new ProtocolError(`${where}: field 'kp' must be ${N_KEYPOINTS} [x, y] pairs`);
      kp.forEach((pair, i) => {
        if (!Array.isArray(pair) || pair.length !== 2) throw new ProtocolError(`${where}: field 'kp[${i}]' must be an [x, y] pair`);
        pair.forEach((c, j) => {
          if (typeof c !== "number" || !Number.isFinite(c) || Math.abs(c) > 1) {
            throw new ProtocolError(`${where}: field 'kp[${i}][${j}]' = ${show(c)} must be a finite number in [-1, 1]`);
          }
        });
      });
    } else if (kind === "beat") {
      num(msg, "frame", where, 0, Infinity, true);
      num(msg, "t_audio", where, 0);
      num(msg, "bpm", where, 0, 1000);
      num(msg, "meter", where, 0, 16, true);
      num(msg, "beat_in_bar", where, 0, 16, true);
      num(msg, "next_beat_in", where, 0, 60);
      num(msg, "beat_index", where, 0, Infinity, true);
    } else if (kind === "status") {
      str(msg, "state", where, STATES);
    } else if (kind === "cmd") {
      const cmd = str(msg, "cmd", where, COMMANDS);
      const args = "args" in msg ? msg.args : {};
      if (!isObject(args)) throw new ProtocolError(`${where}: field 'args' must be an object`);
      if (cmd === "select_bundle") str(args, "path", `${where} args`);
      if (cmd === "latency") num(args, "ms", `${where} args`, -1000, 1000);
    } else if (kind === "features") {
      num(msg, "frame", where, 0, Infinity, true);
      num(msg, "t_audio", where, 0);
      num(msg, "t_capture", where, 0);
      num(msg, "fps", where, 1, 240);
      str(msg, "feature_hash", where);
      validateBeat(msg.beat, where);
      const x = msg.x;
      if (!Array.isArray(x) || x.length < 1 || x.length > MAX_FEATURE_ROWS) {
        throw new ProtocolError(`${where}: field 'x' must be a list of 1..${MAX_FEATURE_ROWS} feature frames`);
      }
      const width = Array.isArray(x[0]) ? x[0].length : -1;
      if (!(width >= 1 && width <= 1024)) throw new ProtocolError(`${where}: field 'x[0]' must be a list of 1..1024 numbers`);
      x.forEach((row, i) => {
        if (!Array.isArray(row) || row.length !== width) throw new ProtocolError(`${where}: field 'x[${i}]' must be a list of ${width} numbers like x[0]`);
        row.forEach((c, j) => {
          if (typeof c !== "number" || !Number.isFinite(c)) throw new ProtocolError(`${where}: field 'x[${i}][${j}]' must be a finite number`);
        });
      });
      num(msg, "context", where, 0, x.length - 1, true);
    }
    return msg;
  }

  function decodeBinary(p, deviceId) {
    if (p.length !== BINARY_SIZE) throw new ProtocolError(`binary pose must be ${BINARY_SIZE} bytes, got ${p.length}`);
    const d = new DataView(p.buffer, p.byteOffset, p.byteLength);
    const version = d.getUint8(1), kind = d.getUint8(2), flags = d.getUint8(3);
    if (version !== SCHEMA_VERSION) throw new ProtocolError(`binary field 'version' is ${version}, this decoder speaks ${SCHEMA_VERSION}`);
    if (kind !== 1) throw new ProtocolError(`binary field 'type' is ${kind}, only 1 (pose) exists`);
    const seq = d.getUint32(4, true), t = d.getFloat64(8, true);
    const kp = [];
    for (let i = 0; i < N_KEYPOINTS; i++) {
      kp.push([d.getInt16(38 + 4 * i, true) / Q15, d.getInt16(40 + 4 * i, true) / Q15]);
    }
    return {
      v: SCHEMA_VERSION, type: "pose", device: deviceId || "unknown", seq, t,
      frame: seq, t_audio: d.getFloat32(16, true), t_capture: t - d.getFloat32(20, true),
      fps: d.getUint8(33), heading: d.getInt16(36, true) * Math.PI / Q15,
      beat: {
        bpm: d.getFloat32(24, true), phase: d.getUint16(28, true) / PHASE_Q16,
        bar_phase: d.getUint16(30, true) / PHASE_Q16, meter: d.getUint8(32), onset: 0,
        is_beat: (flags & 1) === 1, next_beat_in: d.getUint16(34, true) / 1000,
      },
      kp,
    };
  }

  // Bytes (Uint8Array) or text from the wire -> a validated message; ProtocolError otherwise.
  function decode(payload, topic = null) {
    if (typeof payload === "string") payload = new TextEncoder().encode(payload);
    if (!(payload instanceof Uint8Array)) throw new ProtocolError("payload must be bytes");
    if (payload.length > MAX_PAYLOAD) throw new ProtocolError(`payload of ${payload.length} bytes exceeds ${MAX_PAYLOAD}`);
    if (payload.length === 0) throw new ProtocolError("empty payload");
    const topicId = topic ? parseTopic(topic)[0] : null;
    let msg;
    if (payload[0] === BINARY_MAGIC) {
      msg = decodeBinary(payload, topicId);
    } else {
      try {
        msg = JSON.parse(utf8.decode(payload));
      } catch (e) {
        throw new ProtocolError(`payload is neither JSON nor binary pose: ${e.message}`);
      }
      if (!isObject(msg)) throw new ProtocolError(`payload must be a JSON object, got ${Array.isArray(msg) ? "list" : typeof msg}`);
    }
    validate(msg);
    if (topic) {
      const [tid, kind] = parseTopic(topic);
      if (msg.device !== tid) throw new ProtocolError(`field 'device' is ${show(msg.device)} but the topic names ${show(tid)}`);
      if (msg.type !== kind) throw new ProtocolError(`field 'type' is ${show(msg.type)} but the topic is a '${kind}' topic`);
    }
    return msg;
  }

  // Drops stale and out-of-order messages per (device, type), like protocol.SequenceGuard;
  // forget(device) when the device reports a new boot (its seq restarts at 0).
  class SequenceGuard {
    constructor() { this.last = new Map(); this.dropped = 0; }
    accept(msg) {
      const key = msg.device + "\u0000" + msg.type;
      const last = this.last.get(key);
      if (last !== undefined && msg.seq <= last && msg.seq !== 0) { this.dropped += 1; return false; }
      this.last.set(key, msg.seq);
      return true;
    }
    forget(device) {
      for (const key of [...this.last.keys()]) if (key.startsWith(device + "\u0000")) this.last.delete(key);
    }
  }

  return { SCHEMA_VERSION, TOPIC_ROOT, KINDS, ProtocolError, parseTopic, validate, decode, SequenceGuard };
})();
