// Shared by the tracking page and the dispatch board: formatting only.
"use strict";
window.ct = {
  label(enumName, prefix) {
    const words = (enumName || "").replace(prefix, "").toLowerCase().replace(/_/g, " ");
    return words ? words[0].toUpperCase() + words.slice(1) : "–";
  },
  time(iso) {
    if (!iso) return "–";
    return new Date(iso).toLocaleString([], { weekday: "short", hour: "2-digit", minute: "2-digit" });
  },
  window(w) {
    if (!w || (!w.start && !w.end)) return "–";
    return `${ct.time(w.start)} – ${ct.time(w.end)}`;
  },
  // Google encoded polyline (precision 5) -> [[lat, lon], ...]
  decode(encoded) {
    const points = [];
    let index = 0, lat = 0, lon = 0;
    while (index < encoded.length) {
      for (const which of [0, 1]) {
        let shift = 0, result = 0, byte;
        do {
          byte = encoded.charCodeAt(index++) - 63;
          result |= (byte & 0x1f) << shift;
          shift += 5;
        } while (byte >= 0x20);
        const delta = result & 1 ? ~(result >> 1) : result >> 1;
        if (which === 0) lat += delta; else lon += delta;
      }
      points.push([lat / 1e5, lon / 1e5]);
    }
    return points;
  },
};
