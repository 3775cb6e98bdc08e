// otacloud console: live updates over the product's event stream (Server-Sent Events).
// The body's data-stream attribute names the stream; each event is re-dispatched on the
// body as "ota-event" (detail: {name, data, coreid, published_at}), which htmx elements
// listen to with hx-trigger="ota-event from:body" to re-fetch their fragment.
(function () {
  "use strict";
  function start() {
    var url = document.body.getAttribute("data-stream");
    if (!url || !window.EventSource) { return; }
    var status = document.getElementById("live-status");
    var source = new EventSource(url);
    source.onopen = function () {
      if (status) { status.textContent = "Live"; }
    };
    source.onerror = function () {
      if (status) { status.textContent = "Reconnecting…"; }
    };
    source.onmessage = function (message) {
      var detail;
      try { detail = JSON.parse(message.data); } catch (e) { return; }
      document.body.dispatchEvent(new CustomEvent("ota-event", { detail: detail }));
    };
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
