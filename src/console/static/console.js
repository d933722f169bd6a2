// mmsend console: a small enhancement only; every page works without it.
// A form that was submitted disables its buttons, so an impatient second
// click cannot send it again (the server would show the same action anyway).
document.addEventListener("submit", function (e) {
  var form = e.target;
  setTimeout(function () {
    form.querySelectorAll("button").forEach(function (b) {
      b.disabled = true;
      if (b.id === "confirm") { b.textContent = "Starting…"; }
    });
  }, 0);
});

// What the live parts below share: this page fetched again, and whether a
// part of it may be replaced now (not while the person is in it: a field
// changed from what the page brought, or the focus inside).
var mmsendLive = {
  page: function () {
    return fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { return html ? new DOMParser().parseFromString(html, "text/html") : null; });
  },
  mayReplace: function (el) {
    if (el.contains(document.activeElement)) { return false; }
    var fields = el.querySelectorAll("input, select, textarea");
    for (var i = 0; i < fields.length; i++) {
      var f = fields[i];
      if (f.type === "hidden") { continue; }
      if (f.tagName === "SELECT") {
        // a list with no option marked selected starts on its first
        var first = 0;
        for (var j = 0; j < f.options.length; j++) {
          if (f.options[j].defaultSelected) { first = j; break; }
        }
        if (f.selectedIndex !== first) { return false; }
      } else if (f.type === "checkbox" || f.type === "radio") {
        if (f.checked !== f.defaultChecked) { return false; }
      } else if (f.value !== f.defaultValue) { return false; }
    }
    return true;
  }
};

// Live pages: every few seconds ask /status.json for the snapshot's number
// and the queue depths. Depths and the live line update in place; when a
// new snapshot has landed, a page marked `data-live` (overview, groups,
// letters) fetches itself and swaps its content in place, without a
// full-page refresh, and says so to screen readers; not while the person
// is in its content (`mmsendLive.mayReplace`).
(function () {
  var line = document.querySelector("[data-snapshot]");
  if (!line || !window.fetch || !window.DOMParser) { return; }
  var status = document.getElementById("live-status");
  var busy = false;
  function text(sel, value) {
    var el = document.querySelector(sel);
    if (el && typeof value === "string" && el.textContent !== value) { el.textContent = value; }
  }
  function swap(doc) {
    ["#snapshot", "main"].forEach(function (sel) {
      var now = document.querySelector(sel), next = doc.querySelector(sel);
      if (now && next) { now.replaceWith(document.importNode(next, true)); }
    });
    line = document.querySelector("[data-snapshot]");
    if (status) { status.textContent = "Updated: " + (line ? line.textContent : "new snapshot"); }
  }
  function tick() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch("/status.json", { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) {
        if (!s) { return null; }
        text("#live-depth", s.live);
        Object.keys(s.queues).forEach(function (name) {
          document.querySelectorAll("[data-queue]").forEach(function (td) {
            if (td.getAttribute("data-queue") === name) {
              td.textContent = s.queues[name][td.getAttribute("data-field")] || td.textContent;
            }
          });
        });
        var shown = Number(line.getAttribute("data-snapshot"));
        var main = document.querySelector("main[data-live]");
        if (s.snapshot !== shown && main && mmsendLive.mayReplace(main)) {
          return mmsendLive.page().then(function (doc) { if (doc) { swap(doc); } });
        }
        if (s.snapshot === shown) { text("[data-snapshot]", s.line); }
        return null;
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { busy = false; });
  }
  setInterval(tick, 3000);
})();

// Parts of a page marked data-live-every="<seconds>" (each with an id) are
// brought up to date in place instead of reloading the page: a screen
// reader keeps its place and a form being filled in keeps its text. Only
// while the page is shown; a part the person is in waits a turn.
(function () {
  var parts = document.querySelectorAll("[data-live-every][id]");
  if (!parts.length || !window.fetch || !window.DOMParser) { return; }
  var every = 3600;
  parts.forEach(function (p) {
    every = Math.min(every, Number(p.getAttribute("data-live-every")) || 10);
  });
  setInterval(function () {
    if (document.hidden) { return; }
    mmsendLive.page()
      .then(function (fresh) {
        if (!fresh) { return; }
        parts.forEach(function (p) {
          var n = fresh.getElementById(p.id);
          if (n && n.innerHTML !== p.innerHTML && mmsendLive.mayReplace(p)) {
            p.innerHTML = n.innerHTML;
          }
        });
      })
      .catch(function () {});
  }, every * 1000);
})();

// Live progress: an action's page and the Actions list ask the action's
// JSON (/actions/{id}.json) every second and update the state, the numbers
// and the progress bar in place, until the action has finished. Without
// JavaScript the pages offer a Reload link instead.
(function () {
  // one request at a time, none while the page is hidden; stops when the
  // action has finished, is unknown (404) or 30 asks in a row failed
  function poll(url, apply) {
    var timer = null, busy = false, failures = 0;
    function stop() { clearInterval(timer); }
    function tick() {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (r.status === 404) { stop(); return null; }
          return r.ok ? r.json() : null;
        })
        .then(function (a) {
          if (!a) { failures++; if (failures >= 30) { stop(); } return; }
          failures = 0;
          apply(a);
          if (a.finished) { stop(); }
        })
        .catch(function () { failures++; if (failures >= 30) { stop(); } })
        .then(function () { busy = false; });
    }
    timer = setInterval(tick, 1000);
  }

  function setState(el, a) {
    if (!el) { return; }
    if (el.textContent !== a.state) { el.textContent = a.state; }
    ["info", "warn", "good", "bad"].forEach(function (c) { el.classList.remove(c); });
    el.classList.add(a.state_class);
  }

  var page = document.getElementById("action");
  if (page && page.dataset.poll && !document.getElementById("progress-box").hidden) {
    poll(page.dataset.poll, function (a) {
      setState(document.getElementById("state"), a);
      var bar = document.getElementById("progress");
      bar.max = a.progress.max;
      bar.value = a.progress.value;
      document.getElementById("progress-label").textContent = a.progress.text;
      document.getElementById("progress-box").hidden = a.finished;
      var msg = document.getElementById("message");
      msg.textContent = a.message || "";
      msg.hidden = !a.message;
      var body = document.querySelector("#numbers tbody");
      var rows = document.createDocumentFragment();
      a.numbers.forEach(function (n) {
        var tr = document.createElement("tr");
        var th = document.createElement("th");
        th.textContent = n.label;
        var td = document.createElement("td");
        td.className = "n";
        td.dataset.name = n.name;
        td.textContent = n.value;
        tr.appendChild(th);
        tr.appendChild(td);
        rows.appendChild(tr);
      });
      body.replaceChildren(rows);
      var stop = document.getElementById("stop-form");
      if (stop && !a.stoppable) { stop.hidden = true; }
      var reload = document.getElementById("reload-box");
      if (reload && a.finished) { reload.hidden = true; }
    });
  }

  document.querySelectorAll("table.actions-list tr[data-poll]").forEach(function (tr) {
    poll(tr.dataset.poll, function (a) { setState(tr.querySelector("[data-state]"), a); });
  });
})();
