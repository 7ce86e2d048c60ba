// The dispatch board: follows /v1/alerts:subscribe as NDJSON through fetch() (an
// EventSource cannot send the Authorization header). After a dropped connection it
// resumes with Last-Event-ID = the last resume position received, and deduplicates
// by alert id (delivery is at least once across a resume).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SEVERITY = { SEVERITY_INFO: 1, SEVERITY_WARNING: 2, SEVERITY_CRITICAL: 3 };
  const alerts = new Map();   // alertId -> alert, in arrival order
  let lastId = "";
  let controller = null;
  let running = false;

  const token = () => sessionStorage.getItem("cargotrack.dispatcher-token") || "";

  function status(text, error) {
    $("connection").textContent = text;
    $("connection").className = error ? "error" : "notice";
  }

  function visible(alert) {
    const kind = $("kind").value;
    const minimum = Number($("severity").value);
    return (!kind || alert.kind === kind) && (SEVERITY[alert.severity] || 0) >= minimum;
  }

  function item(alert) {
    const li = document.createElement("li");
    li.dataset.alertId = alert.alertId;
    li.dataset.kind = alert.kind || "";
    li.dataset.severity = alert.severity || "";
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = ct.label(alert.kind, "ALERT_KIND_");
    const link = document.createElement("a");
    link.href = `#shipment=${encodeURIComponent(alert.shipmentId || "")}`;
    link.textContent = alert.shipmentId || "?";
    const when = document.createElement("time");
    when.dateTime = alert.detectedAt || "";
    when.textContent = ct.time(alert.detectedAt);
    const text = document.createElement("div");
    text.textContent = alert.message || "";
    li.append(kind, " · ", ct.label(alert.severity, "SEVERITY_"), " · ", link, " · ", when, text);
    return li;
  }

  function draw() {
    const shown = [...alerts.values()].filter(visible).reverse();  // newest first
    $("alerts").replaceChildren(...shown.map(item));
    $("count").textContent = `${shown.length} shown of ${alerts.size}`;
  }

  function take(line) {
    if (!line.trim()) return;  // heartbeat
    const parsed = JSON.parse(line);
    if (parsed.error) throw Object.assign(new Error(parsed.error.message), { status: parsed.error });
    const alert = parsed.result.alert;
    lastId = parsed.id || lastId;
    if (!alerts.has(alert.alertId)) {
      alerts.set(alert.alertId, alert);
      draw();
    }
  }

  async function follow() {
    const headers = { Authorization: `Bearer ${token()}`, Accept: "application/x-ndjson" };
    if (lastId) headers["Last-Event-ID"] = lastId;
    controller = new AbortController();
    const response = await fetch("/v1/alerts:subscribe?fromBeginning=true", { headers, signal: controller.signal });
    if (response.status === 401 || response.status === 403) {
      throw Object.assign(new Error("token refused"), { fatal: true });
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    status("Live");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        take(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
      }
    }
  }

  async function run() {
    running = true;
    while (running) {
      try {
        await follow();
        if (running) status("Reconnecting…");
      } catch (error) {
        if (!running) return;
        if (error.fatal) {
          status("The token was refused: sign in again.", true);
          signOut();
          return;
        }
        status("Connection lost; reconnecting…", true);
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  function signIn(value) {
    sessionStorage.setItem("cargotrack.dispatcher-token", value);
    $("signin").hidden = true;
    $("board").hidden = false;
    status("Connecting…");
    run();
  }

  function signOut() {
    running = false;
    if (controller) controller.abort();
    sessionStorage.removeItem("cargotrack.dispatcher-token");
    alerts.clear();
    lastId = "";
    draw();
    $("board").hidden = true;
    $("shipment").hidden = true;
    $("signin").hidden = false;
  }

  // Why a shipment cannot be shown, in words a dispatcher can act on (never a bare
  // HTTP status). tracking-query answers a shipment of another tenant exactly as a
  // missing one (NOT_FOUND), so 404 cannot say which of the two it is.
  function lookupProblem(status) {
    switch (status) {
      case 404: return "No shipment with this id, or not one your account may see.";
      case 400: return "This is not a valid shipment id.";
      case 401: case 403: return "Your sign-in was refused: sign out and sign in again.";
      case 429: return "Too many requests just now; try again in a minute.";
      default: return "The shipment cannot be loaded right now; try again in a moment.";
    }
  }

  async function showShipment() {
    const match = location.hash.match(/^#shipment=(.+)$/);
    if (!match || !token()) return;
    const id = decodeURIComponent(match[1]);
    const problem = $("shipment-problem");
    // A network failure has no status at all (null): the default message.
    const response = await fetch(`/v1/shipments/${encodeURIComponent(id)}`, {
      headers: { Authorization: `Bearer ${token()}` },
    }).catch(() => null);
    const details = $("shipment-details");
    const rows = [["Shipment", id]];
    if (response && response.ok) {
      const s = (await response.json()).shipment || {};
      rows.push(["Status", ct.label(s.status, "SHIPMENT_STATUS_")], ["Customer", s.customerId || "–"],
        ["Vehicle", s.vehicleId || "–"], ["Expected", ct.time(s.eta && s.eta.estimatedArrival)],
        ["Promised", ct.window(s.promisedWindow)]);
      if (s.trackingToken) rows.push(["Tracking page", `/t/${s.trackingToken}`]);
      problem.hidden = true;
      problem.textContent = "";
    } else {
      problem.textContent = lookupProblem(response ? response.status : 0);
      problem.hidden = false;
    }
    details.replaceChildren(...rows.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      if (name === "Tracking page") {
        const a = document.createElement("a");
        a.href = value;
        a.textContent = value;
        dd.append(a);
      } else {
        dd.textContent = value;
      }
      return [dt, dd];
    }));
    $("shipment").hidden = false;
  }

  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    $("token").value = "";
    if (value) signIn(value);
  });
  $("signout").addEventListener("click", signOut);
  $("kind").addEventListener("change", draw);
  $("severity").addEventListener("change", draw);
  window.addEventListener("hashchange", showShipment);
  if (token()) signIn(token());
})();
