// Progressive enhancement for the console: the pending list refreshes itself and waiting times
// tick. Everything works without this file (reload the page).
"use strict";

function since(ms) {
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function tick() {
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = since(Number(el.dataset.since));
  }
}

// Replaces the pending section when the set of requests (or their votes) changed, unless the
// reader is typing a reason in it.
async function refresh() {
  const section = document.getElementById("pending");
  if (!section) return;
  const active = document.activeElement;
  if (active && section.contains(active) && active.value) return;
  try {
    const res = await fetch(section.dataset.src, { credentials: "same-origin", cache: "no-store" });
    if (!res.ok) return;
    const doc = new DOMParser().parseFromString(await res.text(), "text/html");
    const fresh = doc.getElementById("pending");
    if (!fresh) return;
    const key = (el) => el.dataset.ids + "|" + el.querySelectorAll(".votes li").length;
    if (key(fresh) !== key(section)) {
      section.replaceWith(document.adoptNode(fresh));
    }
  } catch (e) {
    // Network hiccup: try again at the next tick.
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setInterval(tick, 1000);
  if (document.getElementById("pending")) setInterval(refresh, 1500);
});
