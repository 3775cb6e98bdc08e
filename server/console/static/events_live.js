// otacloud console: the events page adds each event of the product's stream (re-dispatched
// by console.js as "ota-event") to its table as text, newest first, when its name starts
// with the page's filter; the table keeps data-max-rows rows.
(function () {
  "use strict";
  function cell(row, text) {
    var td = document.createElement("td");
    td.textContent = text == null ? "" : String(text);
    row.appendChild(td);
  }
  function start() {
    var table = document.getElementById("events-table");
    var rows = document.getElementById("events-rows");
    if (!table || !rows) { return; }
    var prefix = table.getAttribute("data-prefix") || "";
    var maxRows = parseInt(table.getAttribute("data-max-rows") || "500", 10);
    document.body.addEventListener("ota-event", function (event) {
      var e = event.detail || {};
      var name = e.name || "";
      if (prefix && name.indexOf(prefix) !== 0) { return; }
      var row = document.createElement("tr");
      cell(row, e.published_at);
      cell(row, name);
      cell(row, e.coreid);
      cell(row, e.data);
      rows.insertBefore(row, rows.firstChild);
      while (rows.children.length > maxRows) { rows.removeChild(rows.lastChild); }
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
