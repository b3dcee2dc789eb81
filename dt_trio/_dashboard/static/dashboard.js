// dt-trio dashboard: live regions (server-sent events), actions, bulk selection.
// Every piece of HTML this script inserts was rendered and escaped by the server.
"use strict";

(function () {
  const body = document.body;

  function flash(text, bad) {
    const el = document.getElementById("flash");
    el.textContent = text;
    el.className = bad ? "bad" : "good";
    el.hidden = false;
  }

  function confirmed(text) {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    return new Promise(function (resolve) {
      dialog.addEventListener(
        "close",
        function () { resolve(dialog.returnValue === "ok"); },
        { once: true }
      );
      dialog.returnValue = "";
      dialog.showModal();
    });
  }

  async function post(url, payload) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(payload),
      credentials: "same-origin",
    });
    let answer = {};
    try { answer = await response.json(); } catch (e) { answer = {}; }
    if (!response.ok) {
      throw new Error(answer.error || ("the dashboard answered " + response.status));
    }
    return answer;
  }

  // -- selection on the instance list ------------------------------------------------------

  function picked() {
    return Array.from(document.querySelectorAll("input.pick:checked")).map(function (el) {
      return el.value;
    });
  }

  function showPicked() {
    const el = document.getElementById("picked");
    if (el) el.textContent = picked().length + " selected";
  }

  document.addEventListener("change", function (event) {
    const target = event.target;
    if (target.id === "pick-page") {
      document.querySelectorAll("input.pick").forEach(function (el) { el.checked = target.checked; });
    }
    if (target.id === "all-matching" || target.id === "pick-page" || target.classList.contains("pick")) {
      showPicked();
    }
  });

  function matchingCount() {
    const el = document.getElementById("matching");
    return el ? parseInt(el.dataset.total, 10) : 0;
  }

  // -- live regions ------------------------------------------------------------------------

  function apply(update) {
    const keep = new Set(picked());
    Object.entries(update.replace || {}).forEach(function ([id, html]) {
      const el = document.getElementById(id);
      if (el) el.innerHTML = html;
    });
    Object.entries(update.append || {}).forEach(function ([id, html]) {
      const el = document.getElementById(id);
      if (el) el.insertAdjacentHTML("beforeend", html);
    });
    if (update.replace && update.replace.rows !== undefined) {
      document.querySelectorAll("input.pick").forEach(function (el) { el.checked = keep.has(el.value); });
      showPicked();
    }
    if (update.replace && update.replace.counts !== undefined) {
      const all = document.getElementById("all-count");
      if (all) all.textContent = String(matchingCount());
    }
    body.dataset.updates = String(parseInt(body.dataset.updates || "0", 10) + 1);
  }

  let source = null;

  function stopLive() {
    if (source) source.close();
    source = null;
  }

  if (body.dataset.live) {
    source = new EventSource(body.dataset.live);
    source.addEventListener("update", function (event) { apply(JSON.parse(event.data)); });
    source.addEventListener("reload", function () { stopLive(); window.location.reload(); });
    source.addEventListener("gone", function () {
      stopLive();
      flash("this instance no longer exists (purged)", true);
    });
    source.addEventListener("open", function () { body.dataset.liveOpen = "1"; });
    window.addEventListener("pagehide", stopLive);
  }

  // -- actions on one instance -------------------------------------------------------------

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const box = button.closest("[data-instance]");
    const id = box.dataset.instance;
    const action = button.dataset.action;
    if (button.dataset.confirm && !(await confirmed(button.dataset.confirm))) return;
    if (action === "purge") stopLive();
    try {
      const answer = await post("/api/instances/" + encodeURIComponent(id), { action: action });
      if (action === "purge") {
        window.location.assign("/instances");
        return;
      }
      if (action === "restart" && answer.instanceId !== id) {
        window.location.assign("/instances/" + encodeURIComponent(answer.instanceId));
        return;
      }
      flash(action + ": done", false);
    } catch (error) {
      flash(action + " failed: " + error.message, true);
    }
  });

  // A form's action posted, and how it went said: whether it was done.
  async function submitted(url, payload, done, what) {
    try {
      await post(url, payload);
      flash(done, false);
      return true;
    } catch (error) {
      flash(what + " failed: " + error.message, true);
      return false;
    }
  }

  document.addEventListener("submit", async function (event) {
    const form = event.target;
    if (form.classList.contains("raise")) {
      event.preventDefault();
      const data = new FormData(form);
      const raised = await submitted(
        "/api/instances/" + encodeURIComponent(form.dataset.instance),
        { action: "raise-event", name: data.get("name"), data: data.get("data") || null },
        "event '" + data.get("name") + "' raised",
        "raise event",
      );
      if (raised) form.reset();
    } else if (form.classList.contains("signal")) {
      event.preventDefault();
      const data = new FormData(form);
      await submitted(
        "/api/entities/" + encodeURIComponent(form.dataset.entity),
        { action: "signal", operation: data.get("operation"), input: data.get("input") || null },
        "signal '" + data.get("operation") + "' sent",
        "signal",
      );
    }
  });

  // -- bulk actions ------------------------------------------------------------------------

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-bulk]");
    if (!button) return;
    const action = button.dataset.bulk;
    const allMatching = document.getElementById("all-matching").checked;
    const ids = picked();
    const count = allMatching ? matchingCount() : ids.length;
    if (count === 0) {
      flash("select instances first (or all matching the filter)", true);
      return;
    }
    const what = allMatching ? " instances matching the filter" : " selected instances";
    const text = action.charAt(0).toUpperCase() + action.slice(1) + " " + count + what + "?";
    if (!(await confirmed(text))) return;
    const payload = { action: action };
    if (allMatching) {
      payload.filter = JSON.parse(button.closest(".bulk").dataset.filter);
    } else {
      payload.ids = ids;
    }
    try {
      const answer = await post("/api/bulk", payload);
      flash(action + ": " + answer.done + " of " + answer.matched + " done, " +
        answer.skipped + " skipped" + (answer.errors.length ? "; " + answer.errors.join("; ") : ""),
        answer.errors.length > 0);
      document.querySelectorAll("input.pick, #pick-page, #all-matching").forEach(function (el) {
        el.checked = false;
      });
      showPicked();
    } catch (error) {
      flash(action + " failed: " + error.message, true);
    }
  });
})();
