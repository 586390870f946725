// The live display: MQTT over WebSockets -> validated messages -> a stick figure on a canvas.
// Config comes from /config.json (served by `python -m subscribers.display`); the query
// string may override `device` and `broker`. State for tests and debugging: window.edgedance.
"use strict";

(async () => {
  const STALE_MS = 1000; // no pose frame for this long: the figure dims
  const PULSE_MS = 220; // beat flash decay time constant
  const RATE_WINDOW_MS = 2000; // frame-rate window
  const LATENCY_WINDOW = 25; // median over the last second at 25 fps
  const COLORS = { left: "#38e1c8", right: "#ff6b8b", torso: "#e8ecf5", accent: "#ffd166",
                   dim: "#7d869c", bad: "#ff5566", ok: "#3ddc84" };
  const $ = (id) => document.getElementById(id);

  const cfg = await fetch("config.json", { cache: "no-store" }).then((r) => r.json());
  const params = new URLSearchParams(location.search);
  const wanted = params.get("device") || cfg.device || "+";
  const brokerUrl = params.get("broker") || cfg.broker || `ws://${location.hostname}:9001`;
  const KEYPOINTS = cfg.keypoints;
  const BONES = cfg.bones;
  const side = (i) => (KEYPOINTS[i].startsWith("r_") ? "right" : KEYPOINTS[i].startsWith("l_") ? "left" : "torso");
  // Limbs by side (right: coral, left: teal), the trunk (neck-hips, hip-hip) white.
  const boneColor = ([a, b]) => {
    let sa = side(a), sb = side(b);
    const names = KEYPOINTS[a] + KEYPOINTS[b];
    if (names.includes("neck") && names.includes("shoulder")) sa = sb = sa === "torso" ? sb : sa;
    return COLORS[sa === sb ? sa : "torso"];
  };
  const HEAD = KEYPOINTS.indexOf("head"), NECK = KEYPOINTS.indexOf("neck");

  const stats = { connected: false, subscribed: false, connects: 0, messages: 0, poses: 0, beats: 0, rejected: 0, dropped: 0,
                  lastError: "", drawn: 0 };
  const devices = new Map(); // id -> per-device state
  const guard = new EdgeProtocol.SequenceGuard();
  const select = $("device");

  function deviceState(id) {
    let d = devices.get(id);
    if (!d) {
      d = { id, pose: null, poseAt: 0, format: "", arrivals: [], latencies: [], beatAt: -1e9, beat: null,
            status: null, metrics: null };
      devices.set(id, d);
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      select.appendChild(opt);
      if (wanted !== "+" && id === wanted) select.value = id;
    }
    return d;
  }

  if (wanted === "+") {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = "auto (latest)";
    select.appendChild(opt);
  } else {
    deviceState(wanted);
  }

  function selected() {
    if (select.value) return devices.get(select.value) || null;
    let best = null;
    for (const d of devices.values()) if (!best || d.poseAt > best.poseAt) best = d;
    return best;
  }

  // --- messages -------------------------------------------------------------

  function onMessage(topic, payload) {
    stats.messages += 1;
    const bytes = new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
    let msg;
    try {
      msg = EdgeProtocol.decode(bytes, topic);
    } catch (e) {
      stats.rejected += 1;
      stats.lastError = `${topic}: ${e.message}`;
      return;
    }
    const d = deviceState(msg.device);
    const now = performance.now();
    if (msg.type === "status") {
      if (d.status && d.status.boot !== msg.boot) guard.forget(msg.device);
      d.status = msg;
      return;
    }
    if (msg.type === "metrics") { d.metrics = msg; return; }
    if (!guard.accept(msg)) { stats.dropped = guard.dropped; return; }
    if (msg.type === "pose") {
      stats.poses += 1;
      d.pose = msg;
      d.poseAt = now;
      d.format = bytes[0] === 0xed ? "binary" : "json";
      d.arrivals.push(now);
      while (d.arrivals.length && d.arrivals[0] < now - RATE_WINDOW_MS) d.arrivals.shift();
      d.latencies.push(Date.now() / 1000 - msg.t_capture);
      if (d.latencies.length > LATENCY_WINDOW) d.latencies.shift();
      if (msg.beat.is_beat) d.beatAt = now;
    } else if (msg.type === "beat") {
      stats.beats += 1;
      d.beat = msg;
      d.beatAt = now;
    }
  }

  // --- broker ---------------------------------------------------------------

  const topics = ["pose", "beat", "status", "metrics"].map((k) => `${EdgeProtocol.TOPIC_ROOT}/${wanted}/${k}`);
  const client = mqtt.connect(brokerUrl, {
    username: cfg.username || undefined, password: cfg.password || undefined,
    clientId: `edgedance-display-${Math.random().toString(16).slice(2, 10)}`,
    protocolVersion: 4, clean: true, keepalive: 10, reconnectPeriod: 1000, connectTimeout: 4000,
    resubscribe: false, // subscribe afresh on every connect instead
  });
  const brokerBadge = $("broker-badge");
  const setBadge = (el, cls, text) => { el.className = `badge ${cls}`; el.textContent = text; };
  client.on("connect", () => {
    stats.connected = true;
    stats.connects += 1;
    setBadge(brokerBadge, "ok", "broker: connected");
    client.subscribe(topics, { qos: 1 }, (err, granted) => {
      const refused = err || (granted || []).some((g) => g.qos === 128);
      if (refused) {
        stats.lastError = `subscribe to ${topics.join(", ")} refused${err ? ": " + err.message : ""}`;
        setBadge(brokerBadge, "bad", "broker: subscribe refused");
      } else {
        stats.subscribed = true;
      }
    });
  });
  client.on("reconnect", () => setBadge(brokerBadge, "warn", "broker: reconnecting"));
  client.on("close", () => {
    stats.connected = stats.subscribed = false;
    if (!brokerBadge.classList.contains("warn")) setBadge(brokerBadge, "bad", "broker: disconnected");
  });
  client.on("error", (e) => { stats.lastError = `broker: ${e.message}`; });
  client.on("message", onMessage);

  // --- drawing ---------------------------------------------------------------

  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");

  function fit() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr)), h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return [canvas.clientWidth, canvas.clientHeight];
  }

  function text(s, x, y, size, color, align = "left", weight = 400) {
    ctx.font = `${weight} ${size}px Inter, "Segoe UI", system-ui, "DejaVu Sans", sans-serif`;
    ctx.fillStyle = color;
    ctx.textAlign = align;
    ctx.fillText(s, x, y);
  }

  function drawStage(w, h, pulse, cx, floorY, scale) {
    const bg = ctx.createRadialGradient(cx, h * 0.42, 10, cx, h * 0.42, Math.max(w, h) * 0.75);
    bg.addColorStop(0, "#1b2236");
    bg.addColorStop(1, "#07080d");
    ctx.fillStyle = bg;
    ctx.fillRect(0, 0, w, h);
    if (pulse > 0.01) {
      const flash = ctx.createRadialGradient(cx, h * 0.45, 0, cx, h * 0.45, Math.max(w, h) * 0.6);
      flash.addColorStop(0, `rgba(255, 209, 102, ${0.22 * pulse})`);
      flash.addColorStop(1, "rgba(255, 209, 102, 0)");
      ctx.fillStyle = flash;
      ctx.fillRect(0, 0, w, h);
    }
    const floor = ctx.createLinearGradient(0, floorY, 0, h);
    floor.addColorStop(0, "rgba(56, 225, 200, 0.07)");
    floor.addColorStop(1, "rgba(56, 225, 200, 0)");
    ctx.fillStyle = floor;
    ctx.fillRect(0, floorY, w, h - floorY);
    ctx.strokeStyle = "rgba(125, 134, 156, 0.25)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, floorY);
    ctx.lineTo(w, floorY);
    ctx.stroke();
    // the beat ring spreads over the floor
    const r = scale * (0.35 + 0.9 * (1 - pulse));
    ctx.strokeStyle = `rgba(255, 209, 102, ${0.8 * pulse})`;
    ctx.lineWidth = 2 + 3 * pulse;
    ctx.beginPath();
    ctx.ellipse(cx, floorY, r, r * 0.18, 0, 0, 2 * Math.PI);
    ctx.stroke();
  }

  function drawFigure(kp, cx, cy, scale, alpha, pulse) {
    const P = kp.map(([x, y]) => [cx + x * scale, cy - y * scale]); // y up in the pose, down on the canvas
    ctx.save();
    ctx.globalAlpha = alpha;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    const width = Math.max(3, scale * 0.045);
    ctx.shadowBlur = 10 + 22 * pulse;
    for (const bone of BONES) {
      const [a, b] = bone;
      ctx.strokeStyle = ctx.shadowColor = boneColor(bone);
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(P[a][0], P[a][1]);
      ctx.lineTo(P[b][0], P[b][1]);
      ctx.stroke();
    }
    ctx.shadowBlur = 0;
    ctx.fillStyle = "#ffffff";
    P.forEach(([x, y], i) => {
      if (i === HEAD) return;
      ctx.beginPath();
      ctx.arc(x, y, width * 0.42, 0, 2 * Math.PI);
      ctx.fill();
    });
    if (HEAD >= 0 && NECK >= 0) {
      const r = Math.max(width, 0.42 * Math.hypot(P[HEAD][0] - P[NECK][0], P[HEAD][1] - P[NECK][1]));
      ctx.shadowColor = COLORS.torso;
      ctx.shadowBlur = 12 + 20 * pulse;
      ctx.fillStyle = COLORS.torso;
      ctx.beginPath();
      ctx.arc(P[HEAD][0], P[HEAD][1], r, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.restore();
  }

  function drawTempo(d, pulse) {
    const beat = d && d.pose ? d.pose.beat : null;
    const bpm = beat ? beat.bpm : d && d.beat ? d.beat.bpm : 0;
    const meter = beat ? beat.meter : d && d.beat ? d.beat.meter : 0;
    text(bpm > 0 ? bpm.toFixed(0) : "–", 28, 70, 48, COLORS.torso, "left", 600);
    text("BPM", 30, 92, 13, COLORS.dim, "left", 600);
    text(meter ? `${meter}/4` : "metre ?", 30, 122, 15, COLORS.dim, "left", 400);
    const n = meter || 4;
    const current = beat ? Math.floor(beat.bar_phase * n) % n : -1;
    for (let i = 0; i < n; i++) {
      const on = i === current && meter;
      ctx.beginPath();
      ctx.fillStyle = on ? COLORS.accent : "rgba(125, 134, 156, 0.35)";
      ctx.arc(36 + i * 22, 146, on ? 7 + 3 * pulse : 6, 0, 2 * Math.PI);
      ctx.fill();
    }
    // the beat phase as a thin bar under the dots
    const phase = beat ? beat.phase : 0;
    ctx.fillStyle = "rgba(125, 134, 156, 0.25)";
    ctx.fillRect(28, 164, n * 22 - 8, 3);
    ctx.fillStyle = COLORS.accent;
    ctx.fillRect(28, 164, (n * 22 - 8) * phase, 3);
  }

  function drawHeading(w, heading) {
    // Seen from above with the viewer at the bottom: 0 = facing the viewer.
    const x = w - 62, y = 68, r = 34;
    ctx.strokeStyle = "rgba(125, 134, 156, 0.45)";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.fillStyle = COLORS.dim;
    ctx.fillRect(x - 1, y + r - 6, 2, 8); // the viewer's side
    if (heading !== null) {
      const dx = Math.sin(heading), dy = Math.cos(heading);
      ctx.strokeStyle = ctx.fillStyle = COLORS.accent;
      ctx.lineWidth = 3;
      ctx.lineCap = "round";
      ctx.beginPath();
      ctx.moveTo(x - dx * r * 0.45, y - dy * r * 0.45);
      ctx.lineTo(x + dx * r * 0.7, y + dy * r * 0.7);
      ctx.stroke();
      ctx.beginPath();
      ctx.arc(x + dx * r * 0.7, y + dy * r * 0.7, 4, 0, 2 * Math.PI);
      ctx.fill();
    }
    text("heading", x, y + r + 18, 11, COLORS.dim, "center", 600);
  }

  function drawBanner(w, h, s, color) {
    ctx.fillStyle = "rgba(7, 8, 13, 0.6)";
    ctx.fillRect(0, h / 2 - 34, w, 68);
    text(s, w / 2, h / 2 + 10, 26, color, "center", 600);
  }

  function frame() {
    const [w, h] = fit();
    const now = performance.now();
    const d = selected();
    const pulse = d ? Math.exp(-(now - d.beatAt) / PULSE_MS) : 0;
    const scale = Math.min(w, h) * 0.4, cx = w / 2, cy = h * 0.48, floorY = cy + scale * 0.92;
    drawStage(w, h, pulse, cx, floorY, scale);
    const offline = d && d.status && d.status.state !== "online";
    if (d && d.pose) {
      const stale = now - d.poseAt > STALE_MS;
      drawFigure(d.pose.kp, cx, cy, scale, stale || offline ? 0.35 : 1, pulse);
      stats.drawn += 1;
    } else {
      text(`waiting for pose frames on ${EdgeProtocol.TOPIC_ROOT}/${d ? d.id : wanted}/pose`, cx, cy, 15, COLORS.dim, "center");
    }
    drawTempo(d, pulse);
    drawHeading(w, d && d.pose ? d.pose.heading : null);
    text(d ? d.id : wanted === "+" ? "all devices" : wanted, 28, h - 24, 13, COLORS.dim, "left", 600);
    if (offline) drawBanner(w, h, `device ${d.status.state}${d.status.reason ? ": " + d.status.reason : ""}`,
                            d.status.state === "offline" ? COLORS.bad : COLORS.accent);
    else if (!stats.connected) drawBanner(w, h, "broker unreachable, reconnecting…", COLORS.accent);
    requestAnimationFrame(frame);
  }

  // --- side panel --------------------------------------------------------------

  const fmt = (x, digits, unit) => (x === null || x === undefined || !Number.isFinite(x) ? "–" : `${x.toFixed(digits)}${unit}`);
  const median = (xs) => { if (!xs.length) return null; const s = [...xs].sort((a, b) => a - b); return s[s.length >> 1]; };
  const deviceBadge = $("device-badge");

  function panel() {
    const d = selected();
    const now = performance.now();
    const beat = d && d.pose ? d.pose.beat : null;
    $("s-bpm").textContent = beat && beat.bpm > 0 ? `${beat.bpm.toFixed(1)} bpm` : "–";
    $("s-meter").textContent = beat && beat.meter ? `${beat.meter} beats / bar` : "–";
    $("s-next").textContent = beat ? fmt(beat.next_beat_in * 1000, 0, " ms") : "–";
    $("s-beats").textContent = String(stats.beats);
    let fps = null;
    if (d && d.arrivals.length > 1 && now - d.poseAt < STALE_MS) {
      fps = (d.arrivals.length - 1) / ((d.arrivals[d.arrivals.length - 1] - d.arrivals[0]) / 1000);
    }
    $("s-fps").textContent = fmt(fps, 1, " fps");
    $("s-latency").textContent = d ? fmt(median(d.latencies) * 1000, 0, " ms") : "–";
    $("s-devlat").textContent = d && d.pose ? fmt((d.pose.t - d.pose.t_capture) * 1000, 0, " ms") : "–";
    $("s-heading").textContent = d && d.pose ? fmt(d.pose.heading * 180 / Math.PI, 0, "°") : "–";
    $("s-format").textContent = d && d.format ? d.format : "–";
    $("s-frames").textContent = String(stats.poses);
    $("s-rejected").textContent = String(stats.rejected);
    $("s-rejected").className = stats.rejected ? "bad" : "";
    $("s-dropped").textContent = String(stats.dropped);
    $("last-error").textContent = stats.lastError;
    const st = d && d.status;
    $("s-bundle").textContent = st && st.bundle ? st.bundle : "–";
    const m = d && d.metrics;
    $("s-devp").textContent = m ? `${fmt(m.latency_ms_p50, 0, "")} / ${fmt(m.latency_ms_p99, 0, " ms")}` : "–";
    $("s-cpu").textContent = m ? fmt(m.cpu_percent, 0, " %") : "–";
    if (!stats.connected) setBadge(deviceBadge, "", "device: unknown");
    else if (!st) setBadge(deviceBadge, "", `device: no status`);
    else setBadge(deviceBadge, st.state === "online" ? "ok" : st.state === "offline" ? "bad" : "warn", `device: ${st.state}`);
  }

  window.edgedance = { stats, devices, client, config: { broker: brokerUrl, device: wanted, topics } };
  requestAnimationFrame(frame);
  setInterval(panel, 250);
  panel();
})();
