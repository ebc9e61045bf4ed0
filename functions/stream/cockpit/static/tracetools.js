// Finding one's way in a long trace: filter by tool and status, search the text, fold the
// phases, jump to the first error. All of it runs in the page over what is already loaded.
//
// Invariants:
// - Filtering never removes a row: a row that does not match gets `data-filtered` (CSS hides
//   it), so every message keeps its element and live updates land where they belong.
// - A row arriving while a filter is on is checked as it arrives (`admit`); no full pass.
// - Fold state belongs to the person: live updates never open or close a phase. Only their own
//   actions do (a filter change opens the phases that hold matches; a jump opens its target's).

const ERROR_SELECTOR = "details.tool.failed, .ev-log[data-level='40'], .ev-log[data-level='50'], .ev-thought.failed, .ev-status.failed";
const SEARCH_DELAY_MS = 150;

export class TraceTools {
  constructor(root, trace, follower) {
    this.trace = trace;
    this.follower = follower;
    this.el = {
      tool: root.querySelector("#tv-filter-tool"),
      status: root.querySelector("#tv-filter-status"),
      search: root.querySelector("#tv-search"),
      jump: root.querySelector("#tv-jump-error"),
      fold: root.querySelector("#tv-fold-all"),
      count: root.querySelector("#tv-filter-count"),
    };
    this.tools = new Set();
    this.filter = { tool: "", status: "", query: "" };
    this.searchTimer = null;
    this.onTool = () => this.changed();
    this.onSearch = () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => this.changed(), SEARCH_DELAY_MS);
    };
    this.onJump = () => this.jumpToFirstError();
    this.onFold = () => this.foldAll();
    this.el.tool.addEventListener("change", this.onTool);
    this.el.status.addEventListener("change", this.onTool);
    this.el.search.addEventListener("input", this.onSearch);
    this.el.jump.addEventListener("click", this.onJump);
    this.el.fold.addEventListener("click", this.onFold);
    this.reset();
  }

  // A new task: empty choices, no filter.
  reset() {
    this.tools.clear();
    this.el.tool.replaceChildren(new Option("any", ""));
    this.el.status.value = "";
    this.el.search.value = "";
    this.filter = { tool: "", status: "", query: "" };
    this.el.jump.disabled = true;
    this.el.count.textContent = "";
    this.el.fold.textContent = "Fold phases";
  }

  detach() {
    clearTimeout(this.searchTimer);
    this.el.tool.removeEventListener("change", this.onTool);
    this.el.status.removeEventListener("change", this.onTool);
    this.el.search.removeEventListener("input", this.onSearch);
    this.el.jump.removeEventListener("click", this.onJump);
    this.el.fold.removeEventListener("click", this.onFold);
  }

  // A tool name seen for the first time becomes a choice.
  sawTool(name) {
    if (this.tools.has(name)) return;
    this.tools.add(name);
    const options = [...this.tools].sort();
    const chosen = this.el.tool.value;
    this.el.tool.replaceChildren(new Option("any", ""), ...options.map((n) => new Option(n, n)));
    this.el.tool.value = chosen;
  }

  sawError() {
    this.el.jump.disabled = false;
  }

  active() {
    const f = this.filter;
    return Boolean(f.tool || f.status || f.query);
  }

  // A row just rendered (or a tool call just finished): hide it if the filter says so.
  admit(row) {
    if (!this.active() || !row) return;
    if (row.matches("section.phase")) {
      setFiltered(row, true); // shown again by its first matching row
      return;
    }
    const match = this.matches(row);
    setFiltered(row, !match);
    if (match) row.closest("section.phase")?.removeAttribute("data-filtered");
  }

  matches(row) {
    const f = this.filter;
    const isTool = row.matches("details.tool");
    if ((f.tool || f.status) && !isTool) return false;
    if (f.tool && row.dataset.tool !== f.tool) return false;
    if (f.status && row.dataset.status !== f.status) return false;
    if (!f.query) return true;
    // A tool call's body is built when opened (trace.js): its data is what is searched.
    const said = Array.isArray(row.searchText) ? row.searchText.join("\n") : row.textContent;
    return said.toLowerCase().includes(f.query);
  }

  rows() {
    return this.trace.querySelectorAll(":scope > .ev, :scope > details.tool, .phase-body > .ev, .phase-body > details.tool");
  }

  changed() {
    this.filter = {
      tool: this.el.tool.value,
      status: this.el.status.value,
      query: this.el.search.value.trim().toLowerCase(),
    };
    const on = this.active();
    let shown = 0;
    let total = 0;
    for (const row of this.rows()) {
      total += 1;
      const match = !on || this.matches(row);
      setFiltered(row, !match);
      if (match) shown += 1;
    }
    for (const phase of this.trace.querySelectorAll("section.phase")) {
      const any = phase.querySelector(".phase-body > :not([data-filtered]):not([hidden])");
      setFiltered(phase, on && !any);
      if (on && any) phase.querySelector("details.phase-fold").open = true; // the person asked to see these
    }
    this.el.count.textContent = on ? `${shown} of ${total} rows match` : "";
  }

  foldAll() {
    const folds = [...this.trace.querySelectorAll("details.phase-fold")];
    const fold = folds.some((d) => d.open);
    for (const d of folds) d.open = !fold;
    this.el.fold.textContent = fold ? "Unfold phases" : "Fold phases";
  }

  jumpToFirstError() {
    const target = this.trace.querySelector(ERROR_SELECTOR);
    if (!target) return;
    if (target.hasAttribute("data-filtered")) {
      // the filter hides it: the person asked for the error, so show everything again
      this.el.tool.value = "";
      this.el.status.value = "";
      this.el.search.value = "";
      this.changed();
    }
    for (let el = target.parentElement; el && el !== this.trace; el = el.parentElement) if (el.tagName === "DETAILS") el.open = true;
    if (target.tagName === "DETAILS") target.open = true;
    this.follower.stop();
    const focusable = target.tagName === "DETAILS" ? target.querySelector("summary") : target;
    if (focusable !== target || target.tabIndex < 0) target.tabIndex = -1;
    target.scrollIntoView({ block: "center" });
    focusable.focus({ preventScroll: true });
  }
}

function setFiltered(row, hide) {
  if (hide) row.setAttribute("data-filtered", "");
  else row.removeAttribute("data-filtered");
}
