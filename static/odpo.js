/* odpo Label tab: keyboard shortcuts and the instant flip to the prefetched pair.
 *
 * Shortcuts: 1 / ArrowLeft = A is better, 2 / ArrowRight = B is better, 3 = tie, 4 = both bad,
 * s = skip, u = undo. Ignored while typing in a field (Esc leaves the field) or with a modifier.
 *
 * The page renders two slots (#odpo-slot-0/1); <html data-odpo-slot> says which one is visible.
 * A vote shows the other, already rendered slot at once when the server said it is ready, then
 * waits (votes locked) until the server's answer arrives in #odpo-sync: {active, ready, seq}.
 * The server is the authority: whatever it says is applied, so a refused vote snaps back.
 * No external resources; runs from <head>. */
(function () {
  "use strict";
  var KEYS = {
    "1": "odpo-btn-left", "ArrowLeft": "odpo-btn-left",
    "2": "odpo-btn-right", "ArrowRight": "odpo-btn-right",
    "3": "odpo-btn-tie", "4": "odpo-btn-bad",
    "s": "odpo-btn-skip", "S": "odpo-btn-skip",
    "u": "odpo-btn-undo", "U": "odpo-btn-undo"
  };
  var VOTES = { "odpo-btn-left": 1, "odpo-btn-right": 1, "odpo-btn-tie": 1, "odpo-btn-bad": 1, "odpo-btn-skip": 1 };
  var LOCK_MS = 5000;  // give up waiting for the server after this long
  var sync = { active: 0, ready: false, seq: 0 };
  var lock = { seq: null, until: 0 };
  var api = { sync: sync, lock: lock, voted: "" };  // voted: "slot:seq" seen at the vote (VOTE_JS)

  function setSlot(i) {
    document.documentElement.setAttribute("data-odpo-slot", String(i));
  }

  function locked() {
    return lock.seq !== null && Date.now() < lock.until;
  }

  function applySync(root) {
    var el = root.querySelector(".odpo-sync-data");
    if (!el) return;
    var seq = parseInt(el.getAttribute("data-seq"), 10) || 0;
    if (seq <= sync.seq) return;  // already applied, or an older answer arriving late
    sync.seq = seq;
    sync.active = parseInt(el.getAttribute("data-active"), 10) || 0;
    sync.ready = el.getAttribute("data-ready") === "1";
    setSlot(sync.active);
    if (lock.seq !== null && seq > lock.seq) lock.seq = null;
  }

  function watchSync() {
    var root = document.getElementById("odpo-sync");
    if (!root) return false;
    new MutationObserver(function () { applySync(root); })
      .observe(root, { subtree: true, childList: true, attributes: true, characterData: true });
    applySync(root);
    return true;
  }

  function whenReady() {
    if (watchSync()) return;
    var waiter = new MutationObserver(function () { if (watchSync()) waiter.disconnect(); });
    waiter.observe(document.documentElement, { subtree: true, childList: true });
  }

  function isTyping(el) {
    if (!el || el === document.body) return false;
    var tag = (el.tagName || "").toUpperCase();
    return el.isContentEditable || tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT";
  }

  // Capture phase on document: runs before Gradio's own (delegated) click handling, so a click
  // during the lock never reaches the server, and the flip happens before the request is sent.
  document.addEventListener("click", function (e) {
    var btn = e.target && e.target.closest ? e.target.closest("button") : null;
    if (!btn || !(VOTES[btn.id] || btn.id === "odpo-btn-undo")) return;
    if (locked()) { e.stopImmediatePropagation(); e.preventDefault(); return; }
    lock.seq = sync.seq;
    lock.until = Date.now() + LOCK_MS;
    // The server refuses a vote for a slot other than its own: a page out of sync never mislabels.
    api.voted = (document.documentElement.getAttribute("data-odpo-slot") || "0") + ":" + sync.seq;
    if (VOTES[btn.id] && sync.ready) {
      sync.active = 1 - sync.active;
      sync.ready = false;
      setSlot(sync.active);
    }
  }, true);

  document.addEventListener("keydown", function (e) {
    var target = e.target;
    if (e.key === "Escape" && isTyping(target)) { target.blur(); return; }
    if (e.defaultPrevented || e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
    if (isTyping(target) || isTyping(document.activeElement)) return;
    var id = KEYS[e.key];
    if (!id) return;
    var btn = document.getElementById(id);
    if (btn && btn.tagName !== "BUTTON") btn = btn.querySelector("button");
    if (!btn || btn.offsetParent === null || btn.disabled) return;  // Label tab not on screen
    e.preventDefault();
    btn.classList.add("odpo-pressed");
    setTimeout(function () { btn.classList.remove("odpo-pressed"); }, 150);
    btn.click();
  }, true);

  window.odpo = api;  // read by VOTE_JS and the browser tests
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", whenReady);
  else whenReady();
})();
