// Winnow labeling page. Everything from the server goes into the page with
// textContent or as an attribute value, never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const HEADERS = { "Content-Type": "application/json", "X-Winnow-Csrf": "1" };
  let lease = null;
  let busy = false;
  let poll = null;
  let zoom = 1;

  async function api(path, body) {
    const response = await fetch(path, {
      method: "POST", headers: HEADERS, credentials: "same-origin",
      body: JSON.stringify(body || {}),
    });
    if (response.status === 401) { window.location.assign("/login"); throw new Error("signed out"); }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { const e = new Error(data.detail || response.statusText); e.status = response.status; throw e; }
    return data;
  }

  function say(text) { $("message").textContent = text || ""; }

  function showStats(stats) {
    if (!stats) return;
    $("queue-depth").textContent = String(stats.queue_depth);
    $("my-count").textContent = String(stats.my_count);
    $("my-rate").textContent = String(stats.my_rate_per_hour);
  }

  // Classes named 0-9 (digits) get their own digit as key; others take 1-9 then 0 in order.
  function digitNamed(classes) {
    return classes.length <= 10 && classes.every((c) => /^[0-9]$/.test(c));
  }
  function keyFor(index) {
    if (lease && digitNamed(lease.frame.classes)) return lease.frame.classes[index];
    return index < 9 ? String(index + 1) : index === 9 ? "0" : "";
  }
  function classForKey(key) {
    const classes = lease.frame.classes;
    if (digitNamed(classes)) return classes.includes(key) ? key : undefined;
    return classes[key === "0" ? 9 : Number(key) - 1];
  }

  function show(next) {
    lease = next;
    const img = $("frame");
    const classes = $("classes");
    classes.replaceChildren();
    if (!lease) {
      img.hidden = true; img.removeAttribute("src");
      $("empty").hidden = false;
      for (const id of ["prediction", "confidence", "reason", "scores", "source", "captured", "frame-id"]) $(id).textContent = "";
      $("correction").hidden = true;
      if (!poll) poll = setInterval(next_frame, 2000);
      return;
    }
    if (poll) { clearInterval(poll); poll = null; }
    const f = lease.frame;
    $("empty").hidden = true;
    img.hidden = false;
    img.src = f.image;  // a data: URL the server built from a known image type
    img.alt = "frame " + f.frame_id;
    $("prediction").textContent = f.prediction;
    $("confidence").textContent = Math.round(f.confidence * 100) + "%";
    $("reason").textContent = f.reason || "";
    $("scores").textContent = Object.entries(f.scores).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => k + " " + v.toFixed(2)).join(" · ");
    $("source").textContent = f.source_id || "—";
    $("captured").textContent = f.captured_at || "—";
    $("frame-id").textContent = f.frame_id;
    $("correction").hidden = !lease.correction;
    $("correction").textContent = lease.correction ? "Correcting your answer (" + lease.previous + "): pick the right one." : "";
    f.classes.forEach((name, i) => {
      const button = document.createElement("button");
      button.type = "button"; button.className = "cls"; button.dataset.label = name;
      const key = keyFor(i);
      if (key) { const kbd = document.createElement("kbd"); kbd.textContent = key; button.append(kbd, " "); }
      button.append(document.createTextNode(name));
      button.addEventListener("click", () => answer({ label: name }));
      classes.append(button);
    });
  }

  async function next_frame() {
    try { const data = await api("/api/next"); showStats(data.stats); if (data.lease || lease) show(data.lease); }
    catch (e) { say(e.message); }
  }

  async function act(fn) {
    if (busy) return;
    busy = true;
    try { await fn(); } catch (e) { say(e.message); if (e.status === 409) await next_frame(); }
    finally { busy = false; }
  }

  function answer(choice) {
    if (!lease) return;
    return act(async () => {
      const data = await api("/api/answer", { lease_id: lease.lease_id, ...choice });
      say("Saved " + (data.label.label || "can't tell") + " for " + data.label.frame_id + ".");
      showStats(data.stats);
      await next_frame();
    });
  }

  function skip() {
    if (!lease) return;
    return act(async () => {
      const data = await api("/api/skip", { lease_id: lease.lease_id });
      showStats(data.stats); say("Skipped; it goes back to the queue."); await next_frame();
    });
  }

  function undo() {
    return act(async () => { const data = await api("/api/undo"); showStats(data.stats); show(data.lease); say(""); });
  }

  function setZoom(value) {
    zoom = Math.min(8, Math.max(1, value));
    $("zoom").value = String(zoom);
    applyView();
  }

  function applyView() {
    const img = $("frame");
    img.style.transform = "scale(" + zoom + ")";
    img.style.filter = "contrast(" + $("contrast").value + "%) brightness(" + $("brightness").value + "%)";
  }

  $("zoom").addEventListener("input", (e) => setZoom(Number(e.target.value)));
  $("zoom-in").addEventListener("click", () => setZoom(zoom * 1.25));
  $("zoom-out").addEventListener("click", () => setZoom(zoom / 1.25));
  $("contrast").addEventListener("input", applyView);
  $("brightness").addEventListener("input", applyView);
  $("reset-view").addEventListener("click", () => { $("contrast").value = "100"; $("brightness").value = "100"; setZoom(1); });
  $("stage").addEventListener("wheel", (e) => { e.preventDefault(); setZoom(zoom * (e.deltaY < 0 ? 1.1 : 1 / 1.1)); }, { passive: false });
  $("stage").addEventListener("mousemove", (e) => {
    const r = e.currentTarget.getBoundingClientRect();
    $("frame").style.transformOrigin = ((e.clientX - r.left) / r.width * 100) + "% " + ((e.clientY - r.top) / r.height * 100) + "%";
  });
  $("unlabelable").addEventListener("click", () => answer({ status: "unlabelable" }));
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.target.tagName === "INPUT") return;
    if (/^[0-9]$/.test(e.key) && lease) {
      const name = classForKey(e.key);
      if (name !== undefined) { e.preventDefault(); answer({ label: name }); }
    } else if (e.key === "u") { answer({ status: "unlabelable" }); }
    else if (e.key === "s") { skip(); }
    else if (e.key === "z" || (e.key === "Backspace")) { e.preventDefault(); undo(); }
    else if (e.key === "+" || e.key === "=") { setZoom(zoom * 1.25); }
    else if (e.key === "-") { setZoom(zoom / 1.25); }
  });

  next_frame();
})();
