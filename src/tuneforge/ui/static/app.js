/* The page's behaviour: method fields, the workspace file picker, live run curves (server-sent
   events), the comparison overlay, the chat (streamed answers, ratings). User text is only ever set with textContent. */
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

  // -- chat: the page relays to its own `tuneforge serve`; the browser never holds the API key --
  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": $('meta[name="csrf"]').content },
      body: JSON.stringify(body)
    });
  }

  function failure(r) {  // the page's {"error": ...} (or the server's message it relays)
    return r.json().then(function (j) { return j.error || ("HTTP " + r.status); },
                         function () { return "HTTP " + r.status; });
  }

  function readEvents(response, onData) {  // server-sent events from a fetch body: `data:` lines
    var reader = response.body.getReader(), decoder = new TextDecoder(), buf = "";
    function pump() {
      return reader.read().then(function (r) {
        if (r.done) return;
        buf += decoder.decode(r.value, { stream: true });
        var blocks = buf.split("\n\n");
        buf = blocks.pop();
        blocks.forEach(function (block) {
          block.split("\n").forEach(function (line) {
            if (line.indexOf("data:") === 0) onData(line.slice(5).trim());
          });
        });
        return pump();
      });
    }
    return pump();
  }

  function randomKey() {
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return (b < 16 ? "0" : "") + b.toString(16); }).join("");
  }

  function chat() {
    var root = $("#chat");
    if (!root) return;
    var pick = $("#chat-target"), status = $("#chat-status"), log = $("#chat-log");
    var history = [], busy = false;
    function setStatus(state, model) {
      status.textContent = state; status.className = "state " + state;
      $("#chat-model").textContent = model || "";
    }
    function showError(text) { $("#chat-error").textContent = text || ""; }
    function start() {
      setStatus("starting"); showError("");
      return post("/chat/start", { target: pick.value }).then(function (r) {
        if (!r.ok) return failure(r).then(function (e) { setStatus("stopped"); throw new Error(e); });
        return r.json().then(function (j) { status.dataset.target = j.target; setStatus("ready", j.model); });
      });
    }
    function turn(role) {
      var node = $("#chat-turn").content.firstElementChild.cloneNode(true);
      node.classList.add(role);
      $(".who", node).textContent = role === "user" ? "you" : pick.value;
      if (role === "user") $(".rate", node).remove();
      log.appendChild(node);
      return node;
    }
    function rate(node, rating) {
      var result = $(".rate-result", node), buttons = $$("button", node);
      buttons.forEach(function (b) { b.disabled = true; });
      result.className = "rate-result"; result.textContent = "sending…";
      post("/chat/feedback", {
        target: node.dataset.target, response_id: node.dataset.responseId, rating: rating,
        correction: $(".correction", node).value, idempotency_key: randomKey()
      }).then(function (r) {
        if (!r.ok) return failure(r).then(function (e) { throw new Error(e); });
        return r.json().then(function (j) {
          result.className = "rate-result stored";
          result.textContent = "stored (feedback #" + j.id + ", " + (rating > 0 ? "thumbs up" : "thumbs down") + ")";
        });
      }).catch(function (e) {
        result.className = "rate-result failed"; result.textContent = "not stored: " + e.message;
      }).then(function () { buttons.forEach(function (b) { b.disabled = false; }); });
    }
    function answer(node, r) {
      var text = $(".text", node), failed = null;
      return readEvents(r, function (data) {
        if (data === "[DONE]") return;
        var chunk = JSON.parse(data);
        if (chunk.error) { failed = chunk.error.message || String(chunk.error); return; }
        if (chunk.id) node.dataset.responseId = chunk.id;
        var choice = (chunk.choices || [])[0] || {};
        if (choice.delta && typeof choice.delta.content === "string") text.textContent += choice.delta.content;
      }).then(function () { if (failed) throw new Error(failed); return text.textContent; });
    }
    function send(ev) {
      ev.preventDefault();
      var input = $("#chat-input"), content = input.value;
      if (busy || !content.trim()) return;
      busy = true; showError(""); $("#chat-send").disabled = true;
      history.push({ role: "user", content: content });
      $(".text", turn("user")).textContent = content;
      input.value = "";
      var node = turn("assistant"), target = pick.value;
      node.dataset.target = target; node.classList.add("streaming");
      var ready = status.dataset.target === target && status.textContent === "ready" ? Promise.resolve() : start();
      ready.then(function () {
        return post("/chat/completions", {
          target: target, messages: history,
          max_tokens: +$("#chat-max-tokens").value, temperature: +$("#chat-temperature").value
        });
      }).then(function (r) {
        if (!r.ok) return failure(r).then(function (e) { throw new Error(e); });
        return answer(node, r);
      }).then(function (text) {
        history.push({ role: "assistant", content: text });
        if (node.dataset.responseId) $(".rate", node).hidden = false;
      }).catch(function (e) {
        history.pop(); node.remove(); showError(e.message);
      }).then(function () {
        node.classList.remove("streaming"); busy = false; $("#chat-send").disabled = false;
      });
    }
    function clear() { history = []; log.textContent = ""; showError(""); }
    log.addEventListener("click", function (ev) {
      var b = ev.target.closest("button.thumb");
      if (b) rate(b.closest(".turn"), b.classList.contains("up") ? 1 : -1);
    });
    $("#chat-form").addEventListener("submit", send);
    $("#chat-input").addEventListener("keydown", function (ev) {
      if (ev.key === "Enter" && !ev.shiftKey) send(ev);
    });
    $("#chat-start").addEventListener("click", function () { start().catch(function (e) { showError(e.message); }); });
    $("#chat-stop").addEventListener("click", function () {
      post("/chat/stop", {}).then(function () { status.dataset.target = ""; setStatus("stopped"); });
    });
    $("#chat-clear").addEventListener("click", clear);
    pick.addEventListener("change", function () { clear(); setStatus("stopped"); status.dataset.target = ""; });
  }

  document.addEventListener("DOMContentLoaded", function () {
    methodFields(); picker(); live(); overlay(); chat();
  });
})();
