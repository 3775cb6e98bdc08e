// otacloud console: live updates over the product's event stream (Server-Sent Events).
// The body's data-stream attribute names the stream; each event is re-dispatched on the
// body as "ota-event" (detail: {name, data, coreid, published_at, device_id}), which htmx elements
// listen to with hx-trigger="ota-event from:body" to re-fetch their fragment. A list with
// id "live-events" gets one item per event, newest first (at most 50).
(function () {
  "use strict";
  var MAX_ITEMS = 50;

  function showEvent(list, detail) {
    var item = document.createElement("li");
    var when = document.createElement("time");
    when.textContent = detail.published_at || "";
    if (detail.published_at) { when.setAttribute("datetime", detail.published_at); }
    var name = document.createElement("code");
    name.textContent = detail.name || "";
    item.appendChild(when);
    item.appendChild(document.createTextNode(" "));
    item.appendChild(name);
    if (detail.data !== null && detail.data !== undefined && detail.data !== "") {
      item.appendChild(document.createTextNode(" " + String(detail.data)));
    }
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_ITEMS) { list.removeChild(list.lastChild); }
    var empty = document.getElementById("live-events-empty");
    if (empty) { empty.hidden = true; }
  }

  function start() {
    var url = document.body.getAttribute("data-stream");
    if (!url || !window.EventSource) { return; }
    var status = document.getElementById("live-status");
    var source = new EventSource(url);
    source.onopen = function () {
      if (status) { status.textContent = "Live"; }
    };
    source.onerror = function () {
      if (status) {
        status.textContent = source.readyState === EventSource.CLOSED
          ? "Not live: reload the page" : "Reconnecting…";
      }
    };
    source.onmessage = function (message) {
      var detail;
      try { detail = JSON.parse(message.data); } catch (e) { return; }
      var list = document.getElementById("live-events");
      if (list) { showEvent(list, detail); }
      document.body.dispatchEvent(new CustomEvent("ota-event", { detail: detail }));
    };
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
