// Following the live end of a trace, and only when the person is there.
//
// Invariants:
// - A view opens at its top (the title and the outcome) and does not follow.
// - It follows while the person is at the bottom: their own scroll to the end (mouse, End key)
//   or the "Follow the live end" button turns following on; a scroll up turns it off. Content
//   growing under a follower (phases laid out late, see task.css) keeps it following.
// - While not following, nothing here scrolls: new rows never move the view. Nothing reads
//   layout per event either (a scroll is asked for at most once per frame).
// - The scroller is the trace's nearest scrolling ancestor, else the page: the layout around
//   the task view may change without this module knowing.

const AT_BOTTOM_PX = 48;

export class Follower {
  constructor(trace, button) {
    this.trace = trace;
    this.button = button;
    this.following = false;
    this.live = false; // a running task: only then is there a live end to follow
    this.queued = false;
    this.lastTop = 0;
    this.onScroll = () => this.scrolled();
    this.onClick = () => this.start();
    document.addEventListener("scroll", this.onScroll, { capture: true, passive: true });
    button.addEventListener("click", this.onClick);
    this.resized = new ResizeObserver(() => this.rendered());
    this.resized.observe(trace);
    this.show();
  }

  detach() {
    document.removeEventListener("scroll", this.onScroll, { capture: true });
    this.resized.disconnect();
    this.button.removeEventListener("click", this.onClick);
    this.button.hidden = true;
  }

  // Found again at most once a second: a scroll event must not walk the ancestors' styles.
  scroller() {
    const now = performance.now();
    if (this.found && now - this.foundAt < 1000) return this.found;
    this.foundAt = now;
    this.found = document.scrollingElement || document.documentElement;
    for (let el = this.trace.parentElement; el && el !== document.body; el = el.parentElement) {
      const y = getComputedStyle(el).overflowY;
      if ((y === "auto" || y === "scroll") && el.scrollHeight > el.clientHeight) {
        this.found = el;
        break;
      }
    }
    return this.found;
  }

  position() {
    const s = this.scroller();
    const [top, height] = s === document.scrollingElement ? [window.scrollY, window.innerHeight] : [s.scrollTop, s.clientHeight];
    return { top, atBottom: top + height >= s.scrollHeight - AT_BOTTOM_PX };
  }

  scrolled() {
    const was = this.following;
    const { top, atBottom } = this.position();
    if (top < this.lastTop - 2) this.following = false; // the person scrolled up
    else if (atBottom) this.following = this.live;
    this.lastTop = top;
    if (was !== this.following) this.show();
  }

  setLive(live) {
    this.live = live;
    if (!live) this.following = false;
    this.show();
  }

  start() {
    this.following = true;
    this.show();
    this.scrollToEnd();
  }

  stop() {
    this.following = false;
    this.show();
  }

  show() {
    this.button.hidden = !this.live || this.following;
  }

  // After new rows: to the end if following, else nothing at all.
  rendered() {
    if (this.following) this.scrollToEnd();
  }

  scrollToEnd() {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => {
      this.queued = false;
      if (!this.following) return;
      const s = this.scroller();
      // Our own scroll lands at the bottom, so its scroll event keeps following on.
      if (s === document.scrollingElement) window.scrollTo(0, s.scrollHeight);
      else s.scrollTop = s.scrollHeight;
    });
  }
}
