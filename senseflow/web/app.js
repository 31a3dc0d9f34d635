// The live page: polls api/sessions every second (If-None-Match: unchanged = 304, nothing
// to do), renders per host with at most ROWS_STEP rows more per "Show more", and a chart of
// the per-minute peaks (api/sessions/history since start, then kept up to date here).
"use strict";
(() => {
  const POLL_MS = 1000;
  const ROWS_STEP = 100;
  const TOP_APPS = 8;
  const MINUTES = 60;
  const TOKEN_KEY = "senseflow.token";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let doc = null;
  let etag = "";
  let filter = "";
  let skewMs = 0;
  let peaks = []; // [{minute, sessions, users, connections}], oldest first
  const rowsShown = new Map(); // host -> rows shown

  // -- auth: `?token=` once, then sessionStorage; basic auth is the browser's own --------
  function takeToken() {
    const params = new URLSearchParams(location.search);
    const token = params.get("token");
    if (token === null) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const rest = params.toString();
    window.history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  function get(path, extra) {
    const headers = Object.assign({}, extra);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    // fetch refuses URLs with credentials (http://user:pw@host/); the browser's cached
    // basic auth for this origin is sent without them
    const url = new URL(path, location.href);
    url.username = url.password = "";
    return fetch(url, { headers, cache: "no-store", credentials: "same-origin" });
  }

  function askToken() {
    const form = $("login");
    form.hidden = false;
    status("Access token needed");
    form.onsubmit = (event) => {
      event.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, $("token").value);
      form.hidden = true;
      start();
    };
  }

  // -- polling ---------------------------------------------------------------------------
  async function poll() {
    try {
      const answer = await get("api/sessions", etag ? { "If-None-Match": etag } : {});
      if (answer.status === 401) return askToken();
      if (answer.status === 200) {
        etag = answer.headers.get("ETag") || "";
        doc = await answer.json();
        skewMs = Date.parse(doc.at) - Date.now();
        render();
        markFirstRender();
        status("Live");  // announced when it changes; the time beside it is not
        $("changed").textContent = "· changed " + clock(new Date(Date.parse(doc.at)));
      } else if (answer.status !== 304) {
        status("senseflow answered " + answer.status + ", retrying");
      }
      if (doc) {
        record(doc.totals);
        // the "(12 min)" beside each start time, once a minute even without a change
        const minute = Math.floor((Date.now() + skewMs) / 60000);
        if (answer.status === 304 && minute !== renderedMinute) renderHosts();
      }
    } catch (error) {
      status("Cannot reach senseflow, retrying");
    }
    setTimeout(poll, POLL_MS);
  }

  let rendered = false;
  function markFirstRender() {
    // for measurements (tests/e2e/test_live_page.py): the frame after the first data
    if (rendered) return;
    rendered = true;
    performance.mark("senseflow-rendered");
    requestAnimationFrame(() => setTimeout(() => performance.mark("senseflow-painted")));
  }

  async function loadHistory() {
    try {
      const answer = await get("api/sessions/history", {});
      if (answer.status !== 200) return;
      const body = await answer.json();
      peaks = body.minutes.map((m) => ({
        minute: Math.floor(Date.parse(m.at) / 60000),
        sessions: m.sessions, users: m.users, connections: m.connections,
      }));
      drawChart();
    } catch (error) { /* the chart fills from the polls */ }
  }

  function start() {
    loadHistory().then(poll);
  }

  function status(text) {
    const node = $("status");
    if (node.textContent !== text) node.textContent = text;
    node.parentElement.classList.toggle("down", text !== "Live");
  }

  // -- history ---------------------------------------------------------------------------
  function record(totals) {
    const minute = Math.floor((Date.now() + skewMs) / 60000);
    const last = peaks[peaks.length - 1];
    if (last && last.minute === minute) {
      for (const key of ["sessions", "users", "connections"]) {
        last[key] = Math.max(last[key], totals[key]);
      }
    } else {
      peaks.push(Object.assign({ minute }, totals));
    }
    peaks = peaks.filter((m) => m.minute > minute - MINUTES);
    drawChart();
  }

  function svg(name, attributes, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawChart() {
    const width = Math.max(240, $("chart").clientWidth || 600), height = 150;
    const left = 48, bottom = 20, top = 8;
    const now = peaks.length ? peaks[peaks.length - 1].minute : 0;
    const peak = Math.max(1, ...peaks.map((m) => Math.max(m.users, m.sessions)));
    const x = (minute) => left + ((minute - (now - MINUTES + 1)) / (MINUTES - 1)) * (width - left - 4);
    const y = (value) => top + (1 - value / peak) * (height - top - bottom);
    const current = peaks[peaks.length - 1] || { users: 0, sessions: 0 };
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-labelledby": "chart-title",
      class: "chart-svg",
    });
    chart.append(svg("title", { id: "chart-title" },
      `Users now ${current.users}, sessions now ${current.sessions}; ` +
      `peak in the last hour ${peak}`));
    chart.append(svg("line", { x1: left, x2: width, y1: y(0), y2: y(0), class: "axis" }));
    chart.append(svg("line", { x1: left, x2: width, y1: y(peak), y2: y(peak), class: "grid" }));
    chart.append(svg("text", { x: left - 6, y: y(peak) + 4, class: "tick end" }, peak.toLocaleString()));
    chart.append(svg("text", { x: left - 6, y: y(0) + 4, class: "tick end" }, "0"));
    chart.append(svg("text", { x: left, y: height - 4, class: "tick" }, "60 min ago"));
    chart.append(svg("text", { x: width - 4, y: height - 4, class: "tick end" }, "now"));
    for (const key of ["sessions", "users"]) {
      const points = peaks.map((m) => `${x(m.minute).toFixed(1)},${y(m[key]).toFixed(1)}`);
      if (points.length === 1) points.push(`${(x(now) + 3).toFixed(1)},${y(current[key]).toFixed(1)}`);
      chart.append(svg("polyline", { points: points.join(" "), class: "line " + key }));
    }
    for (const key of ["sessions", "users"]) {
      chart.append(svg("circle", { cx: x(now), cy: y(current[key]), r: 3, class: "dot " + key }));
    }
    $("chart").replaceChildren(chart);
  }

  // -- rendering -------------------------------------------------------------------------
  function el(name, className, text) {
    const node = document.createElement(name);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clock(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function duration(ms) {
    const minutes = Math.max(0, Math.floor(ms / 60000));
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    return hours < 48 ? `${hours} h ${String(minutes % 60).padStart(2, "0")} min` : `${Math.floor(hours / 24)} days`;
  }

  function appLabel(app) {
    if (!app.appId) return "Hub";
    return app.appName || app.appId;
  }

  function plural(count, noun) { return `${count.toLocaleString()} ${noun}${count === 1 ? "" : "s"}`; }

  function userName(user) { return `${user.userDirectory}\\${user.userId}`; }

  function searchText(user) {
    if (user._search === undefined) {
      const parts = [userName(user)];
      for (const app of user.apps) parts.push(app.appName || "", app.appId || "hub");
      user._search = parts.join("\n").toLowerCase();
    }
    return user._search;
  }

  function render() {
    if (!doc) return;
    const totals = doc.totals;
    for (const key of ["sessions", "users", "connections"]) {
      const node = $("count-" + key);
      const text = totals[key].toLocaleString();
      if (node.textContent !== text) node.textContent = text;
    }
    renderApps();
    renderHosts();
  }

  function renderApps() {
    const usage = new Map();
    for (const host of doc.hosts) {
      for (const user of host.active) {
        for (const app of user.apps) {
          const key = app.appId || "";
          const entry = usage.get(key) || { label: appLabel(app), connections: 0, users: new Set() };
          entry.connections += app.connections;
          entry.users.add(host.host + "\n" + userName(user).toLowerCase());
          usage.set(key, entry);
        }
      }
    }
    const ranked = [...usage.values()].sort((a, b) => b.connections - a.connections || a.label.localeCompare(b.label));
    const most = ranked.length ? ranked[0].connections : 1;
    const items = ranked.slice(0, TOP_APPS).map((app) => {
      const item = el("li");
      item.append(el("span", "app-name", app.label));
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = `${(100 * app.connections) / most}%`;
      bar.append(fill);
      item.append(bar, el("span", "app-count",
        `${app.connections.toLocaleString()} conn. · ${plural(app.users.size, "user")}`));
      return item;
    });
    if (!items.length) items.push(el("li", "empty", "No app open"));
    $("apps").replaceChildren(...items);
  }

  let renderedMinute = 0;
  function renderHosts() {
    renderedMinute = Math.floor((Date.now() + skewMs) / 60000);
    const needle = filter.trim().toLowerCase();
    const sections = [];
    let matched = 0;
    for (const host of doc.hosts) {
      const users = needle ? host.active.filter((u) => searchText(u).includes(needle)) : host.active;
      matched += users.length;
      if (needle && !users.length) continue;
      sections.push(hostSection(host, users));
    }
    if (!sections.length) sections.push(el("p", "empty", needle ? "Nobody matches." : "Nobody is on Qlik Sense now."));
    // a re-render replaces the nodes: keep the keyboard focus on its host's "Show more"
    const focused = document.activeElement;
    const focusedHost = focused && focused.classList.contains("more") ? focused.dataset.host : null;
    $("hosts").replaceChildren(...sections);
    if (focusedHost !== null) {
      const again = [...document.querySelectorAll("#hosts button.more")].find((b) => b.dataset.host === focusedHost);
      if (again) again.focus();
    }
    const result = needle ? `${matched} user${matched === 1 ? "" : "s"} match “${filter.trim()}”` : "";
    if ($("search-result").textContent !== result) $("search-result").textContent = result;
  }

  function hostSection(host, users) {
    const section = el("section", "host");
    section.append(el("h2", "", host.host));
    section.append(el("p", "host-counts", [
      plural(host.users, "user"), plural(host.sessions, "session"), plural(host.connections, "connection"),
    ].join(" · ")));
    const table = el("table");
    const caption = el("caption", "visually-hidden", `Users on ${host.host} now`);
    table.append(caption);
    const head = el("thead");
    const headRow = el("tr");
    for (const title of ["User", "Since", "Apps open", "Browser / OS"]) {
      const th = el("th", "", title);
      th.scope = "col";
      headRow.append(th);
    }
    head.append(headRow);
    const body = el("tbody");
    const limit = rowsShown.get(host.host) || ROWS_STEP;
    const now = Date.now() + skewMs;
    for (const user of users.slice(0, limit)) body.append(userRow(user, now));
    table.append(head, body);
    const wrap = el("div", "table-wrap");
    wrap.append(table);
    section.append(wrap);
    if (users.length > limit) {
      const more = el("button", "more", `Show ${Math.min(ROWS_STEP, users.length - limit)} more (${users.length - limit} not shown)`);
      more.type = "button";
      more.dataset.host = host.host;
      more.onclick = () => { rowsShown.set(host.host, limit + ROWS_STEP); renderHosts(); };
      section.append(more);
    }
    return section;
  }

  function userRow(user, now) {
    const row = el("tr");
    const name = el("th", "user", userName(user));
    name.scope = "row";
    if (user.sessions > 1) name.append(el("span", "badge", `${user.sessions} sessions`));
    const since = el("td", "since");
    const started = new Date(Date.parse(user.since));
    const time = el("time", "", started.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
    time.title = started.toLocaleString();
    time.dateTime = user.since;
    since.append(time, el("span", "ago", ` (${duration(now - Date.parse(user.since))})`));
    const apps = el("td", "apps-open");
    if (!user.apps.length) apps.append(el("span", "none", "—"));
    for (const app of user.apps) {
      const chip = el("span", app.appId ? "app" : "app hub", appLabel(app));
      if (app.connections > 1) chip.append(el("span", "times", ` ×${app.connections}`));
      chip.title = app.appId || "hub";
      apps.append(chip);
    }
    const client = el("td", "client", `${user.browser || "?"} · ${user.os || "?"}`);
    row.append(name, since, apps, client);
    return row;
  }

  // -- start -----------------------------------------------------------------------------
  let pending = false;
  $("search").addEventListener("input", (event) => {
    filter = event.target.value;
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; if (doc) renderHosts(); });
  });
  $("search-form").addEventListener("submit", (event) => event.preventDefault());
  let resizing = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(resizing);
    resizing = requestAnimationFrame(drawChart);
  });
  takeToken();
  drawChart();
  start();
})();
