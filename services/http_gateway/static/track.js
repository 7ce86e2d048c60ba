// The public tracking page: reads /v1/track/{token}, then follows
// /v1/track/{token}:watch (Server-Sent Events; the browser resumes by itself with
// Last-Event-ID). Shows only what the public view holds (docs/query.md).
"use strict";
(() => {
  const token = decodeURIComponent(location.pathname.split("/").pop() || "");
  const base = `/v1/track/${encodeURIComponent(token)}`;
  const $ = (id) => document.getElementById(id);
  const tileUrl = document.body.dataset.tileUrl;

  const map = L.map("map", { zoomControl: true, attributionControl: !!tileUrl });
  if (tileUrl) L.tileLayer(tileUrl, { maxZoom: 19 }).addTo(map);
  map.setView([51.5, 0], 5);
  const layers = { route: null, destination: null, vehicle: null };
  let fitted = false;

  function setLayer(name, layer) {
    if (layers[name]) map.removeLayer(layers[name]);
    layers[name] = layer;
    if (layer) layer.addTo(map);
  }

  function render(s) {
    $("reference").textContent = s.reference ? `· ${s.reference}` : "";
    $("status").textContent = ct.label(s.status, "SHIPMENT_STATUS_");
    document.body.dataset.status = s.status || "";
    const eta = s.eta || {};
    $("eta").textContent = ct.time(eta.estimatedArrival);
    $("eta-window").textContent = eta.earliest ? ct.window({ start: eta.earliest, end: eta.latest }) : "–";
    $("eta-confidence").textContent = eta.confidence !== undefined ? `${Math.round(eta.confidence * 100)} %` : "–";
    $("promised").textContent = ct.window(s.promisedWindow);
    $("delivered").textContent = ct.time(s.deliveredAt);

    const p = s.progress;
    $("progress-section").hidden = !p;
    if (p) {
      const share = p.routeLengthM ? Math.max(0, Math.min(100, (100 * (p.travelledM || 0)) / p.routeLengthM)) : 0;
      $("progress").value = share;
      $("progress").hidden = !p.routeLengthM;
      const left = `${((p.remainingM || 0) / 1000).toFixed(1)} km to go`;
      $("progress-text").textContent = p.routeLengthM ? `${Math.round(share)} % of the route, ${left}` : left;
    }

    const timeline = $("timeline");
    timeline.replaceChildren(...(s.timeline || []).map((entry) => {
      const li = document.createElement("li");
      const what = document.createElement("span");
      what.textContent = ct.label(entry.kind.toUpperCase(), "");
      const when = document.createElement("time");
      when.dateTime = entry.occurredAt || "";
      when.textContent = ct.time(entry.occurredAt);
      li.append(what, when);
      return li;
    }));

    const bounds = [];
    const route = s.plannedRoute ? ct.decode(s.plannedRoute) : [];
    setLayer("route", route.length ? L.polyline(route, { color: "#0b63b6", weight: 4, opacity: 0.7 }) : null);
    bounds.push(...route);
    if (s.destination) {
      const d = [s.destination.latitude || 0, s.destination.longitude || 0];
      setLayer("destination", L.circleMarker(d, { radius: 8, color: "#b3261e", fillOpacity: 0.9 }).bindTooltip("Destination"));
      bounds.push(d);
    }
    const mapBox = $("map");
    const position = s.lastPosition && s.lastPosition.location;
    if (position) {
      const v = [position.latitude || 0, position.longitude || 0];
      setLayer("vehicle", L.circleMarker(v, { radius: 9, color: "#1b1f24", fillColor: "#ffb300", fillOpacity: 1 }).bindTooltip("Vehicle"));
      mapBox.dataset.vehicle = `${v[0].toFixed(5)},${v[1].toFixed(5)}`;
      $("vehicle").textContent = `Vehicle position at ${ct.time(s.lastPosition.recordedAt)}`;
      bounds.push(v);
    } else {
      setLayer("vehicle", null);
      delete mapBox.dataset.vehicle;
      $("vehicle").textContent = "The vehicle is shown while your delivery is on its way.";
    }
    if (bounds.length && !fitted) {
      map.fitBounds(L.latLngBounds(bounds), { padding: [24, 24], maxZoom: 15 });
      fitted = true;
    }
  }

  // The page says why nothing is shown, in words (never a bare HTTP status). An unknown
  // token (404) and a malformed one (400: cut off, mistyped) are the same to a reader:
  // this link leads to no shipment. Everything else may pass: try again later.
  function unavailable(status) {
    const unknown = status === 404 || status === 400;
    $("connection").textContent = unknown
      ? "No shipment found for this link."
      : status === 429
        ? "Too many lookups from your connection; try again in a minute."
        : "Tracking is unavailable right now; try again later.";
    $("connection").className = "error";
    $("hint").hidden = !unknown;
    // An empty status, map and timeline would only look like a shipment with no news.
    document.querySelector("main").hidden = unknown;
    document.querySelector("footer").hidden = true;
  }

  async function start() {
    const response = await fetch(base, { headers: { Accept: "application/json" } });
    if (!response.ok) {
      unavailable(response.status);
      return;
    }
    render((await response.json()).shipment || {});
    const events = new EventSource(`${base}:watch`);
    events.onopen = () => { $("connection").textContent = "Live"; $("connection").className = "notice"; };
    events.onmessage = (event) => render(JSON.parse(event.data).shipment || {});
    events.addEventListener("error", (event) => {
      if (event.data) {  // the service's status, as `event: error`
        events.close();
        $("connection").textContent = "Live updates stopped; reload the page.";
      } else {
        $("connection").textContent = "Reconnecting…";
      }
    });
  }
  start().catch(() => unavailable(0));
})();
