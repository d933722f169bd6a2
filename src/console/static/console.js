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
