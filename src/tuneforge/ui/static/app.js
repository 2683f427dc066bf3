/* The page's behaviour: method fields, the workspace file picker, live run curves (server-sent
   events), the comparison overlay. User text is only ever set with textContent. */
(function () {
  "use strict";
  var $ = function (sel, root) { return (root || document).querySelector(sel); };
  var $$ = function (sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); };

  function methodFields() {
    var pick = document.getElementById("f-method.name");
    if (!pick) return;
    var show = function () {
      $$("[data-method]").forEach(function (f) { f.hidden = f.dataset.method !== pick.value; });
    };
    pick.addEventListener("change", show);
    show();
  }

  function picker() {
    var box = $("#picker");
    if (!box) return;
    var target = null;
    function open(dir) {
      fetch("/api/files?dir=" + encodeURIComponent(dir), { credentials: "same-origin" })
        .then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
        .then(function (res) {
          var list = $("#picker-list");
          list.textContent = "";
          $("#picker-error").textContent = res[0] ? "" : res[1].error;
          if (!res[0]) return;
          $("#picker-dir").textContent = "workspace/" + res[1].dir;
          if (res[1].dir) {
            var parts = res[1].dir.split("/"); parts.pop();
            list.appendChild(item("..", true, parts.join("/")));
          }
          res[1].entries.forEach(function (e) { list.appendChild(item(e.name + (e.dir ? "/" : ""), e.dir, e.path)); });
        });
    }
    function item(label, isDir, path) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = "#"; a.textContent = label;
      a.addEventListener("click", function (ev) {
        ev.preventDefault();
        if (isDir) { open(path); } else { target.value = path; box.hidden = true; }
      });
      li.appendChild(a);
      return li;
    }
    $$("button.browse").forEach(function (b) {
      b.addEventListener("click", function () {
        target = document.getElementById(b.dataset.target);
        box.hidden = false;
        var dir = target.value.indexOf("/") >= 0 ? target.value.replace(/\/[^/]*$/, "") : "";
        open(dir);
      });
    });
    $("#picker-close").addEventListener("click", function () { box.hidden = true; });
  }

  function wants(svg, key) {
    var names = svg.dataset.series.split(",");
    var exclude = (svg.dataset.exclude || "").split(",");
    if (exclude.indexOf(key) >= 0) return false;
    return names.some(function (n) {
      return n === key || (n.slice(-1) === "*" && key.indexOf(n.slice(0, -1)) === 0);
    });
  }

  function duration(s) {
    s = Math.max(0, Math.round(s));
    var h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), sec = s % 60;
    var two = function (n) { return (n < 10 ? "0" : "") + n; };
    return h ? h + "h" + two(m) + "m" : m ? m + "m" + two(sec) + "s" : sec + "s";
  }

  function live() {
    var root = $("#live");
    if (!root || !window.EventSource) return;
    var charts = $$("svg.chart", root).map(function (svg) { return { svg: svg, chart: new TFChart(svg) }; });
    var total = parseInt(root.dataset.total, 10) || 0;
    var wasActive = root.dataset.state === "running" || root.dataset.state === "queued";
    var source = new EventSource("/run/events?dir=" + encodeURIComponent(root.dataset.dir));
    source.addEventListener("metrics", function (ev) {
      JSON.parse(ev.data).forEach(function (r) {
        if (typeof r.step !== "number") return;
        Object.keys(r).forEach(function (k) {
          charts.forEach(function (c) { if (wants(c.svg, k)) c.chart.add(k, r.step, r[k]); });
        });
        if (typeof r.loss === "number") progress(r);
        if (typeof r.warning === "string") {
          var div = document.createElement("div");
          div.className = "warn"; div.textContent = r.warning;
          $("#warnings").appendChild(div);
        }
      });
    });
    var stretch = null;  // the first record of this process's stretch (elapsed_s restarts on resume)
    function progress(r) {
      if (!stretch || r.elapsed_s < stretch.elapsed_s || r.step <= stretch.step) stretch = r;
      if (total && r.step > stretch.step) {
        var eta = (r.elapsed_s - stretch.elapsed_s) / (r.step - stretch.step) * (total - r.step);
        $("#eta").textContent = duration(eta);
      }
      $("#progress-text").textContent = "step " + r.step + (total ? " of " + total : "");
      if (total) $("#progress").value = Math.min(1, r.step / total);
      if (typeof r.tokens_per_s === "number") $("#tok-s").textContent = Math.round(r.tokens_per_s);
    }
    source.addEventListener("status", function (ev) {
      var s = JSON.parse(ev.data);
      if (s.total_steps) total = s.total_steps;
      var state = $("#state");
      state.textContent = s.state; state.className = "state " + s.state;
      $("#eta-box").hidden = s.state !== "running";
      if (s.has_report) $("#report").hidden = false;
    });
    source.addEventListener("reset", function () { charts.forEach(function (c) { c.chart.clear(); }); });
    source.addEventListener("done", function (ev) {
      source.close();
      var s = JSON.parse(ev.data);
      $("#state").textContent = s.state; $("#state").className = "state " + s.state;
      if (s.has_report) $("#report").hidden = false;
      if (wasActive) window.setTimeout(function () { window.location.reload(); }, 300);
    });
  }

  function overlay() {
    var root = $("#overlay");
    if (!root) return;
    var charts = $$("svg.chart", root).map(function (svg) { return { key: svg.dataset.key, chart: new TFChart(svg) }; });
    root.dataset.runs.split("\n").forEach(function (dir) {
      fetch("/api/metrics?dir=" + encodeURIComponent(dir), { credentials: "same-origin" })
        .then(function (r) { return r.json(); })
        .then(function (series) {
          charts.forEach(function (c) {
            (series[c.key] || []).forEach(function (p) { c.chart.add(dir, p[0], p[1]); });
          });
        });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    methodFields(); picker(); live(); overlay();
    if (window.TFChat) window.TFChat();
  });
})();
