/* tuneforge's line chart: a few dozen lines of SVG, no dependencies, written for this page.
   new TFChart(svgElement) ; chart.add(seriesName, x, y) ; redraws itself on the next frame. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
  var W = 480, H = 220, M = { l: 58, r: 12, t: 12, b: 30 };

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(v) {
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    return String(+v.toPrecision(3));
  }

  function ticks(lo, hi, n) {
    if (hi === lo) return [lo];
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    var err = (hi - lo) / n / step;
    step *= err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1;
    var out = [];
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return out;
  }

  function TFChart(svg) {
    this.svg = svg;
    this.series = [];
    this.byName = {};
    this.pending = false;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.dataset.points = "0";
    this.draw();
  }

  TFChart.prototype.add = function (name, x, y) {
    if (typeof x !== "number" || typeof y !== "number" || !isFinite(x) || !isFinite(y)) return;
    var s = this.byName[name];
    if (!s) {
      s = { name: name, points: [], color: COLORS[this.series.length % COLORS.length] };
      this.byName[name] = s;
      this.series.push(s);
    }
    s.points.push([x, y]);
    this.schedule();
  };

  TFChart.prototype.clear = function () {
    this.series = [];
    this.byName = {};
    this.schedule();
  };

  TFChart.prototype.schedule = function () {
    if (this.pending) return;
    this.pending = true;
    var self = this;
    window.requestAnimationFrame(function () { self.pending = false; self.draw(); });
  };

  TFChart.prototype.draw = function () {
    var svg = this.svg, all = [];
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    this.series.forEach(function (s) { all = all.concat(s.points); });
    svg.dataset.points = String(all.length);
    if (!all.length) {
      svg.appendChild(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no points yet"));
      return;
    }
    var xs = all.map(function (p) { return p[0]; }), ys = all.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { var d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    var pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    var sx = function (x) { return M.l + (x - x0) / (x1 - x0) * (W - M.l - M.r); };
    var sy = function (y) { return H - M.b - (y - y0) / (y1 - y0) * (H - M.t - M.b); };
    var axes = el("g", { class: "axes" });
    ticks(y0, y1, 4).forEach(function (t) {
      axes.appendChild(el("line", { x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t), class: "grid" }));
      axes.appendChild(el("text", { x: M.l - 4, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
    });
    ticks(x0, x1, 5).forEach(function (t) {
      axes.appendChild(el("text", { x: sx(t), y: H - M.b + 16, "text-anchor": "middle" }, fmt(t)));
    });
    axes.appendChild(el("text", { x: W - M.r, y: H - 2, "text-anchor": "end", class: "label" }, "step"));
    svg.appendChild(axes);
    this.series.forEach(function (s, i) {
      var pts = s.points.map(function (p) { return sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1); });
      svg.appendChild(el("polyline", { points: pts.join(" "), fill: "none", stroke: s.color, "stroke-width": 1.6, "data-series": s.name }));
      if (s.points.length <= 40) {
        s.points.forEach(function (p) {
          svg.appendChild(el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.4, fill: s.color }));
        });
      }
      svg.appendChild(el("rect", { x: W - M.r - 150, y: M.t + 2 + i * 14, width: 10, height: 3, fill: s.color }));
      svg.appendChild(el("text", { x: W - M.r - 136, y: M.t + 7 + i * 14, class: "legend" }, s.name));
    });
  };

  window.TFChart = TFChart;
})();
