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

// Live progress: an action's page and the Actions list ask the action's
// JSON (/actions/{id}.json) every second and update the state, the numbers
// and the progress bar in place, until the action has finished. Without
// JavaScript the pages offer a Reload link instead.
(function () {
  function poll(url, apply) {
    var timer = null;
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (a) {
          if (!a) { return; }
          apply(a);
          if (a.finished) { clearInterval(timer); }
        })
        .catch(function () { /* the next tick tries again */ });
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
