/* certbench leaderboard site: sortable, filterable tables. Plain JavaScript, no network.
 *
 * Sorting: a <button data-sort="COLUMN" data-type="number|text" data-first="ascending|
 * descending"> in a table header sorts the rows by the data-value of their cells with
 * data-column="COLUMN"; the first click uses data-first, the next reverses. Numbers compare
 * numerically, text by code point; empty cells always go last; ties keep the board's order.
 * The sorted header gets aria-sort. Filtering: <input data-filter="TABLE_ID"> hides rows
 * whose data-filter-text does not contain every word typed. <input type="checkbox"
 * data-toggle="TABLE_ID"> shows the optional (.opt) columns.
 */
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  function cellValue(row, key) {
    var cells = row.querySelectorAll("[data-column]");
    for (var i = 0; i < cells.length; i++) {
      if (cells[i].getAttribute("data-column") === key) {
        return cells[i].getAttribute("data-value");
      }
    }
    return "";
  }

  function compare(a, b, numeric) {
    if (numeric) {
      return parseFloat(a) - parseFloat(b);
    }
    return a < b ? -1 : a > b ? 1 : 0;
  }

  function status(table, text) {
    var box = document.getElementById("status");
    if (box && table.id === "board") {
      box.textContent = text;
    }
  }

  function visibleCount(table) {
    var rows = table.tBodies[0].rows;
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      if (!rows[i].hidden) {
        shown++;
      }
    }
    return shown + " of " + rows.length + " rows shown";
  }

  function sortTable(table, button) {
    var key = button.getAttribute("data-sort");
    var numeric = button.getAttribute("data-type") === "number";
    var first = button.getAttribute("data-first") || "ascending";
    var th = button.closest("th");
    var current = th.getAttribute("aria-sort");
    var order = current === first ? (first === "ascending" ? "descending" : "ascending") : first;
    var sign = order === "ascending" ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var a = cellValue(r1, key);
      var b = cellValue(r2, key);
      if (a === "" || b === "") {
        if (a === "" && b === "") {
          return r1.getAttribute("data-index") - r2.getAttribute("data-index");
        }
        return a === "" ? 1 : -1;
      }
      var c = sign * compare(a, b, numeric);
      return c !== 0 ? c : r1.getAttribute("data-index") - r2.getAttribute("data-index");
    });
    rows.forEach(function (row) {
      body.appendChild(row);
    });
    table.querySelectorAll("thead th[aria-sort]").forEach(function (other) {
      other.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", order);
    status(table, "Sorted by " + button.getAttribute("aria-label") + ", " + order + "; " +
      visibleCount(table));
  }

  function filterTable(table, text) {
    var words = text.toLowerCase().split(/\s+/).filter(Boolean);
    var rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var hay = rows[i].getAttribute("data-filter-text") || "";
      rows[i].hidden = !words.every(function (w) {
        return hay.indexOf(w) !== -1;
      });
    }
    status(table, visibleCount(table));
  }

  function setUp() {
    document.querySelectorAll("table").forEach(function (table) {
      if (!table.tBodies.length) {
        return;
      }
      Array.prototype.forEach.call(table.tBodies[0].rows, function (row, i) {
        row.setAttribute("data-index", String(i));
      });
      table.querySelectorAll("thead button[data-sort]").forEach(function (button) {
        button.addEventListener("click", function () {
          sortTable(table, button);
        });
      });
    });
    document.querySelectorAll("input[data-filter]").forEach(function (input) {
      var table = document.getElementById(input.getAttribute("data-filter"));
      if (table) {
        input.addEventListener("input", function () {
          filterTable(table, input.value);
        });
        if (input.value) {
          filterTable(table, input.value);
        }
      }
    });
    document.querySelectorAll("input[data-toggle]").forEach(function (box) {
      var table = document.getElementById(box.getAttribute("data-toggle"));
      if (table) {
        var apply = function () {
          table.classList.toggle("show-opt", box.checked);
        };
        box.addEventListener("change", apply);
        apply();
      }
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setUp);
  } else {
    setUp();
  }
})();
