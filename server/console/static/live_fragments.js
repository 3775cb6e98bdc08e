// otacloud console: fragments that follow the product's event stream, at a bounded rate.
//
// An element with data-live-events="prefix1 prefix2" (event-name prefixes) is refreshed
// when console.js re-dispatches a matching event ("ota-event" on the body): the element's
// htmx attributes (hx-get, hx-trigger="ota-refresh", hx-swap="innerHTML") re-fetch it. A
// burst of events (a release to 10,000 devices makes thousands) is coalesced: at most one
// refresh per data-live-min-interval milliseconds (default 1000), and always one after the
// last event of a burst, so the final counts are shown. A fragment whose content carries
// data-live-poll="ms" is refreshed again after that long even without events (transfer
// progress publishes none; a dropped event must not freeze the view).
(function () {
  "use strict";
  var timers = new Map();
  var lastRun = new Map();

  function refresh(element) {
    timers.delete(element);
    lastRun.set(element, Date.now());
    if (window.htmx && document.body.contains(element)) {
      window.htmx.trigger(element, "ota-refresh");
    }
  }

  function schedule(element, atLeastMs) {
    if (timers.has(element)) { return; }  // a refresh is due already: this rides on it
    var gap = parseInt(element.getAttribute("data-live-min-interval") || "1000", 10);
    var since = Date.now() - (lastRun.get(element) || 0);
    var wait = Math.max(atLeastMs || 0, gap - since, 0);
    timers.set(element, window.setTimeout(function () { refresh(element); }, wait));
  }

  function matches(element, name) {
    var prefixes = (element.getAttribute("data-live-events") || "").split(/\s+/);
    for (var i = 0; i < prefixes.length; i++) {
      if (prefixes[i] && name.indexOf(prefixes[i]) === 0) { return true; }
    }
    return false;
  }

  function poll(element) {
    var marked = element.querySelector("[data-live-poll]");
    if (marked) {
      schedule(element, parseInt(marked.getAttribute("data-live-poll"), 10) || 5000);
    }
  }

  function start() {
    var live = document.querySelectorAll("[data-live-events]");
    document.body.addEventListener("ota-event", function (event) {
      var name = (event.detail && event.detail.name) || "";
      for (var i = 0; i < live.length; i++) {
        if (matches(live[i], name)) { schedule(live[i], 0); }
      }
    });
    document.body.addEventListener("htmx:afterSettle", function (event) {
      for (var i = 0; i < live.length; i++) {
        if (live[i] === event.target) { poll(live[i]); }
      }
    });
    for (var i = 0; i < live.length; i++) { poll(live[i]); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
