// The judging page: post choices with fetch and show the next pair at once.
// Model text is untrusted: it is only ever written with textContent, never as HTML.
"use strict";
(function () {
  const form = document.getElementById("judge-form");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const message = $("message");
  let busy = false;

  function setBusy(on) {
    busy = on;
    document.body.dataset.state = on ? "busy" : (form.hidden ? "waiting" : "ready");
    for (const b of form.querySelectorAll("button.choice")) b.disabled = on;
  }

  function showError(text) {
    message.textContent = text;
    message.hidden = !text;
  }

  function showProgress(p) {
    if (!p) return;
    $("count-you").textContent = String(p.you);
    $("count-total").textContent = String(p.total);
    $("count-ready").textContent = String(p.ready);
  }

  function showPair(pair) {
    form.reset();
    if (!pair) {
      form.hidden = true;
      $("waiting").hidden = false;
      document.body.dataset.state = "waiting";
      setTimeout(poll, 1000);
      return;
    }
    $("pair-id").value = pair.pair_id;
    $("prompt").textContent = pair.prompt;
    $("completion-a").textContent = pair.completion_a;
    $("completion-b").textContent = pair.completion_b;
    $("waiting").hidden = true;
    form.hidden = false;
    document.body.dataset.state = "ready";
    window.scrollTo(0, 0);
  }

  async function poll() {
    try {
      const r = await fetch("/api/next?wait=5", { credentials: "same-origin" });
      if (r.status === 401) { window.location.assign("/login"); return; }
      const data = await r.json();
      showProgress(data.progress);
      showPair(data.pair);
    } catch (e) {
      setTimeout(poll, 2000);
    }
  }

  async function submit(choice) {
    if (busy || form.hidden) return;
    const rating = form.querySelector("input[name=rating]:checked");
    const body = {
      pair_id: $("pair-id").value,
      choice: choice,
      rating: rating && rating.value ? Number(rating.value) : null,
      comment: $("comment").value,
    };
    setBusy(true);
    showError("");
    try {
      const r = await fetch("/api/judge", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": $("csrf").value },
        body: JSON.stringify(body),
      });
      if (r.status === 401) { window.location.assign("/login"); return; }
      const data = await r.json();
      setBusy(false);
      if (r.ok) {
        showProgress(data.progress);
        showPair(data.next);
      } else if (r.status === 404 || r.status === 409) {
        showError(data.error || "That pair is no longer yours to judge.");
        poll();
      } else {
        showError(data.error || ("The server answered " + r.status));
      }
    } catch (e) {
      setBusy(false);
      showError("Could not reach the server; your choice was not saved. Try again.");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const button = event.submitter;
    if (button && button.name === "choice") submit(button.value);
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "radio"))) return;
    const button = form.querySelector('button.choice[data-key="' + event.key + '"]');
    if (button) {
      event.preventDefault();
      submit(button.value);
    }
  });

  // the page says "ready" only now that the keys work (a key pressed earlier would be lost)
  document.body.dataset.state = form.hidden ? "waiting" : "ready";
  if (form.hidden) setTimeout(poll, 1000);
})();
