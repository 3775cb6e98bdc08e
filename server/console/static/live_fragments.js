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
  var timers = new Map();  // element -> {id: timeout id, due: epoch ms}
  var lastRun = new Map();

  function refresh(element) {
    timers.delete(element);
    lastRun.set(element, Date.now());
    if (window.htmx && document.body.contains(element)) {
      window.htmx.trigger(element, "ota-refresh");
    }
  }

  function schedule(element, atLeastMs) {
    var gap = parseInt(element.getAttribute("data-live-min-interval") || "1000", 10);
    var now = Date.now();
    var since = now - (lastRun.get(element) || 0);
    var due = now + Math.max(atLeastMs || 0, gap - since, 0);
    var pending = timers.get(element);
    if (pending) {
      if (pending.due <= due) { return; }  // a refresh is due as soon: this rides on it
      window.clearTimeout(pending.id);  // e.g. a slow poll: the event brings it forward
    }
    timers.set(element, {
      id: window.setTimeout(function () { refresh(element); }, due - now),
      due: due
    });
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
