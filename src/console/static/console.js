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

// Parts of a page marked data-live-every="<seconds>" (each with an id) are
// brought up to date in place instead of reloading the page: a screen
// reader keeps its place and a form being filled in keeps its text. Only
// while the page is shown; a part that holds the focus waits a turn.
(function () {
  var parts = document.querySelectorAll("[data-live-every][id]");
  if (!parts.length || !window.fetch || !window.DOMParser) { return; }
  var every = 3600;
  parts.forEach(function (p) {
    every = Math.min(every, Number(p.getAttribute("data-live-every")) || 10);
  });
  setInterval(function () {
    if (document.hidden) { return; }
    fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        parts.forEach(function (p) {
          var n = fresh.getElementById(p.id);
          if (n && n.innerHTML !== p.innerHTML && !p.contains(document.activeElement)) {
            p.innerHTML = n.innerHTML;
          }
        });
      })
      .catch(function () {});
  }, every * 1000);
})();
