// meshgate dashboard: draws what GET /stream pushes (Server-Sent Events, at least once a
// second and right after every event), runs GET /tcp-check, and offers the admin actions when
// meshgate has an admin token. No framework and nothing from the network but this origin.
//
// Every string that comes from the server reaches the page through textContent or an
// attribute, never as markup: client ids and user names are whatever clients chose to send.
'use strict';

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  /** Updates older than this mean the stream is gone, whatever EventSource says. */
  const STALE_MS = 3500;
  const EVENTS_MAX = 300;
  const TCP_EVERY_MS = 10000;
  const LAG_POINTS = 60;
  const TOKEN_KEY = "meshgate-admin-token";

  const $ = (id) => document.getElementById(id);

  let state = null; // the last DashboardState (see src/http/dashboard.rs)
  let events = []; // oldest first
  let lastUpdate = 0;
  let startedMs = null;
  const lagHistory = new Map(); // broker -> [{at, ms}], worst lag of copies reaching it
  let cardsKey = ""; // broker names the cards were built for
  const cards = new Map(); // name -> {root, fields}

  // ---- small DOM helpers ------------------------------------------------

  /** An element with attributes (class, data-*, title, ...) and text or child nodes. */
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined) e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function s(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setText(e, text) {
    text = String(text);
    if (e.textContent !== text) e.textContent = text;
  }

  // ---- formatting (fixed decimals so widths do not wobble) -----------------

  const pad2 = (n) => String(n).padStart(2, "0");
  function clock(ms) {
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }
  function duration(secs) {
    secs = Math.max(0, Math.floor(secs));
    const d = Math.floor(secs / 86400), hr = Math.floor((secs % 86400) / 3600);
    const m = Math.floor((secs % 3600) / 60), sec = secs % 60;
    if (d) return `${d}d ${pad2(hr)}h`;
    if (hr) return `${hr}h ${pad2(m)}m`;
    if (m) return `${m}m ${pad2(sec)}s`;
    return `${sec}s`;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
  }
  function ms(v) {
    if (v === null || v === undefined) return "–";
    return v < 10 ? `${v.toFixed(2)} ms` : v < 100 ? `${v.toFixed(1)} ms` : `${Math.round(v)} ms`;
  }

  // ---- the stream -----------------------------------------------------------

  let source = null;
  function connect() {
    source = new EventSource("/stream");
    source.addEventListener("update", (e) => apply(JSON.parse(e.data)));
    source.onopen = () => setLive("live");
    source.onerror = () => {
      setLive("reconnecting");
      // EventSource retries by itself after network errors; after a refusal it gives up
      // (CLOSED), and meshgate coming back is then worth a fresh one.
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        setTimeout(connect, 2000);
      }
    };
  }

  function setLive(how) {
    const live = $("live");
    if (live.dataset.live !== how) {
      live.dataset.live = how;
      setText($("live-text"), how === "live" ? "live" : how === "reconnecting" ? "reconnecting…" : how);
    }
    document.body.classList.toggle("stale", how !== "live");
  }

  setInterval(() => {
    if (lastUpdate && Date.now() - lastUpdate > STALE_MS) setLive("reconnecting");
    if (lastUpdate) setText($("self-updated"), `${Math.round((Date.now() - lastUpdate) / 1000)} s ago`);
  }, 1000);

  let updates = 0;
  function apply(update) {
    lastUpdate = Date.now();
    document.body.dataset.updates = String(++updates);
    setLive("live");
    const st = update.state;
    if (startedMs !== st.started_ms) {
      // A new meshgate process (or the first update): what we drew belongs to the old one.
      startedMs = st.started_ms;
      document.body.dataset.started = String(startedMs);
      lagHistory.clear();
    }
    events = update.reset ? update.events : events.concat(update.events);
    if (events.length > EVENTS_MAX) events = events.slice(-EVENTS_MAX);
    state = st;
    recordLag(st.replication);
    renderHeader(st);
    renderSelf(st);
    renderTopology();
    renderCards(st);
    renderClients();
    renderEvents(update.reset || update.events.length > 0);
    renderReplication(st.replication);
    renderInstances(st.instances, st.at_ms);
  }

  // ---- header and meshgate's own health ----------------------------------

  function renderHeader(st) {
    const pill = $("status");
    pill.dataset.status = st.health.status;
    setText(pill, st.health.status);
    setText($("current"), st.health.current_broker || "none");
    setText($("sessions"), st.health.sessions);
    setText($("available"), `${st.health.brokers_available}/${st.health.brokers_total}`);
    setText($("version"), `v${st.health.version}`);
  }

  function renderSelf(st) {
    const p = st.process;
    setText($("self-status"), `${st.health.status} · new clients → ${st.health.current_broker || "none"}`);
    setText($("self-version"), `${st.health.version} · pid ${p.pid}`);
    setText($("self-uptime"), duration(st.health.uptime_secs));
    setText($("self-sessions"), `${st.health.sessions}`);
    setText($("self-rss"), bytes(p.rss_bytes));
    setText($("self-threads"), `${p.threads ?? "–"} · ${p.open_fds ?? "–"}`);
    setText($("self-load"), p.load1 === null ? "–" : `${p.load1.toFixed(2)} on ${p.cpus} core${p.cpus === 1 ? "" : "s"}`);
    setText($("self-admin"), st.admin ? "on: buttons ask for the token" : "off (no [admin] token)");
    const note = $("admin-note");
    const stored = st.admin && sessionStorage.getItem(TOKEN_KEY);
    note.hidden = !stored;
    if (stored && !note.firstChild) {
      const forget = h("button", { type: "button" }, "forget token");
      forget.addEventListener("click", () => {
        sessionStorage.removeItem(TOKEN_KEY);
        note.hidden = true;
        toast("admin token forgotten");
      });
      note.append("Admin token kept for this tab. ", forget);
    }
  }

  // ---- topology ----------------------------------------------------------------

  /** Brokers in tier order; each gets its tier's rank (0 = primary). */
  function tiers(brokers) {
    const prios = [...new Set(brokers.map((b) => b.priority))].sort((a, b) => a - b);
    return brokers
      .map((b, i) => ({ b, i, rank: prios.indexOf(b.priority) }))
      .sort((x, y) => x.b.priority - y.b.priority || x.i - y.i);
  }
  const tierName = (rank) => (rank === 0 ? "primary" : `backup ${rank}`);

  /** How a broker is drawn: current (takes new clients), up, down or off. */
  function look(b) {
    if (b.current) return "current";
    if (b.state === "down") return "down";
    if (b.state === "disabled" || b.state === "draining") return "off";
    return "up";
  }

  function renderTopology() {
    if (!state) return;
    const box = $("topology");
    const width = Math.max(280, Math.floor(box.clientWidth));
    const list = tiers(state.brokers);
    const repl = state.replication;
    // A row needs about 100 px per broker; below that, stack them.
    const wide = width >= 560 && width / Math.max(1, list.length) >= 100;
    const svg = wide ? topologyWide(width, list, repl) : topologyNarrow(width, list, repl);
    box.style.height = `${svg.getAttribute("height")}px`;
    box.replaceChildren(svg);
  }

  function meshgateNode(g, x, y, w, hgt) {
    const n = s("g", { class: "node self" });
    n.append(s("rect", { x, y, width: w, height: hgt, rx: 8 }));
    n.append(s("text", { x: x + w / 2, y: y + 18, "text-anchor": "middle", "font-weight": 700 }, "meshgate"));
    const st = state.health;
    n.append(s("text", { x: x + w / 2, y: y + 33, "text-anchor": "middle", class: "small" },
      `${st.sessions} session${st.sessions === 1 ? "" : "s"} · ${st.status}`));
    g.append(n);
  }

  function brokerNode(g, x, y, w, hgt, b, rank, narrow) {
    const n = s("g", { class: `node ${look(b)}`, "data-broker": b.name });
    n.append(s("rect", { x, y, width: w, height: hgt, rx: 7 }));
    const latency = b.last_probe && b.last_probe.ok ? ms(b.last_probe.latency_ms) : "no answer";
    const sessions = `${b.sessions_active} sess`;
    if (narrow) {
      n.append(s("text", { x: x + 10, y: y + 17, "font-weight": 700 }, b.name));
      n.append(s("text", { x: x + w - 10, y: y + 17, "text-anchor": "end", "font-weight": 600 },
        b.current ? "new clients" : b.state));
      n.append(s("text", { x: x + 10, y: y + 32, class: "small" }, `${tierName(rank)} · ${sessions} · ${latency}`));
    } else {
      const cx = x + w / 2;
      n.append(s("text", { x: cx, y: y + 17, "text-anchor": "middle", "font-weight": 700 }, b.name));
      n.append(s("text", { x: cx, y: y + 32, "text-anchor": "middle", class: "small" }, `${b.state} · ${sessions}`));
      n.append(s("text", { x: cx, y: y + 46, "text-anchor": "middle", class: "small" }, latency));
    }
    g.append(n);
  }

  function maxLagInto(repl, name) {
    if (!repl) return null;
    const into = repl.lag.filter((l) => l.to === name).map((l) => l.lag_ms);
    return into.length ? Math.max(...into) : null;
  }

  /** meshgate on top, the tiers in a row below, left to right. */
  function topologyWide(width, list, repl) {
    const pad = 10, nodeY = 112, nodeH = 56;
    const height = repl ? 236 : 204;
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height });
    const g = s("g");
    const slot = (width - 2 * pad) / Math.max(1, list.length);
    const w = Math.min(150, slot - 12);
    const mw = 190, mx = (width - mw) / 2, my = 24, mh = 42;
    g.append(s("text", { x: width / 2, y: 13, "text-anchor": "middle", class: "small" }, "MQTT clients ↓"));
    list.forEach(({ b }, i) => {
      const cx = pad + slot * i + slot / 2;
      const sx = mx + mw * (0.15 + (0.7 * (i + 0.5)) / list.length);
      const cls = look(b);
      g.append(s("path", { class: `edge ${cls}`, d: `M${sx},${my + mh} C${sx},${my + mh + 30} ${cx},${nodeY - 34} ${cx},${nodeY}` }));
    });
    meshgateNode(g, mx, my, mw, mh);
    list.forEach(({ b, rank }, i) => {
      const cx = pad + slot * i + slot / 2;
      brokerNode(g, cx - w / 2, nodeY, w, nodeH, b, rank, false);
      if (b.current) g.append(s("path", { class: "arrow", d: `M${cx - 6},${nodeY - 12} L${cx + 6},${nodeY - 12} L${cx},${nodeY - 3} Z` }));
      g.append(s("text", { x: cx, y: nodeY + nodeH + 15, "text-anchor": "middle", class: "small" },
        `${tierName(rank)} (tier ${b.priority})`));
    });
    if (repl) {
      // Replication runs through meshgate's own link to each broker; one bus under the row.
      const by = nodeY + nodeH + 38;
      const x0 = pad + slot / 2, x1 = pad + slot * (list.length - 0.5);
      g.append(s("path", { class: "repl", d: `M${x0},${by} L${x1},${by}` }));
      list.forEach(({ b }, i) => {
        const cx = pad + slot * i + slot / 2;
        const link = repl.links.find((l) => l.broker === b.name);
        const broken = !link || !link.connected;
        g.append(s("path", { class: `repl${broken ? " broken" : ""}`, d: `M${cx},${nodeY + nodeH + 20} L${cx},${by}` }));
        const lag = maxLagInto(repl, b.name);
        g.append(s("text", { x: cx + 4, y: by - 4, class: "small" }, broken ? "link down" : lag === null ? "" : `lag ${ms(lag)}`));
      });
      g.append(s("text", { x: pad, y: by + 14, class: "small" }, "replication"));
    }
    svg.append(g);
    return svg;
  }

  /** Phone width: meshgate across the top, the brokers stacked below it in tier order. */
  function topologyNarrow(width, list, repl) {
    const pad = 6, rowH = 40, gap = 8, top = 56, busX = 16;
    const height = top + list.length * (rowH + gap);
    const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height });
    const g = s("g");
    list.forEach(({ b }, i) => {
      const y = top + i * (rowH + gap) + rowH / 2;
      g.append(s("path", { class: `edge ${look(b)}`, d: `M${busX},44 L${busX},${y - 8} Q${busX},${y} ${busX + 8},${y} L${busX + 22},${y}` }));
    });
    meshgateNode(g, pad, 4, width - 2 * pad, 40);
    list.forEach(({ b, rank }, i) => {
      const y = top + i * (rowH + gap);
      let label = b;
      if (repl) {
        const link = repl.links.find((l) => l.broker === b.name);
        if (!link || !link.connected) label = Object.assign({}, b, { state: `${b.state} · repl down` });
      }
      brokerNode(g, busX + 22, y, width - busX - 22 - pad, rowH, label, rank, true);
    });
    svg.append(g);
    return svg;
  }

  // ---- broker cards ------------------------------------------------------------

  function buildCard(name) {
    const f = {};
    const field = (key, tag, attrs, text) => (f[key] = h(tag, attrs, text ?? ""));
    const stat = (key, label, title) =>
      h("div", { class: "stat", title }, field(key, "span", { class: "v" }, "–"), h("span", { class: "k" }, label));
    f.spark = s("svg", { class: "spark", viewBox: "0 0 200 34", preserveAspectRatio: "none", "aria-hidden": "true" });
    f.actions = h("div", { class: "actions" });
    for (const [action, label, cls] of [["disable", "disable", "danger"], ["enable", "enable", ""], ["drain", "drain", "danger"]]) {
      const btn = h("button", { type: "button", class: cls, "data-action": action }, label);
      btn.addEventListener("click", () => admin(name, action, btn));
      f.actions.append(btn);
    }
    const root = h("article", { class: "card", "data-broker": name },
      h("div", { class: "card-head" }, h("h3", {}, name), field("badge", "span", { class: "badge" })),
      field("where", "div", { class: "line muted" }),
      field("role", "div", { class: "line role" }),
      field("reason", "div", { class: "line reason" }),
      h("div", { class: "stats" }, stat("sessions", "sessions"), stat("probe", "last probe"),
        stat("fails", "failures", "passive failures in the fail_timeout window / max_fails")),
      f.spark,
      field("foot", "div", { class: "line muted" }),
      f.actions);
    return { root, f };
  }

  function renderCards(st) {
    const key = st.brokers.map((b) => b.name).join("\n");
    if (key !== cardsKey) {
      cardsKey = key;
      cards.clear();
      const box = $("cards");
      box.replaceChildren();
      for (const b of st.brokers) {
        const c = buildCard(b.name);
        cards.set(b.name, c);
        box.append(c.root);
      }
      brokerOptions(st.brokers);
    }
    const ranks = new Map(tiers(st.brokers).map(({ b, rank }) => [b.name, rank]));
    for (const b of st.brokers) {
      const { root, f } = cards.get(b.name);
      root.dataset.state = b.state;
      root.dataset.current = String(b.current);
      f.badge.dataset.state = b.state;
      setText(f.badge, b.state);
      // Weight and max_conns only matter when set; the common case stays one short line.
      const extras = (b.weight !== 1 ? ` · weight ${b.weight}` : "") + (b.max_conns ? ` · max ${b.max_conns}` : "");
      setText(f.where, `${b.address} · ${tierName(ranks.get(b.name))}${extras}`);
      f.where.title = `tier ${b.priority}, weight ${b.weight}, max_conns ${b.max_conns || "unlimited"}`;
      let role;
      if (b.current) role = "★ takes new clients";
      else if (b.available) role = "standby";
      else if (b.state === "down") role = `down since ${clock(b.since_ms)}`;
      else role = b.state;
      setText(f.role, role);
      const p = b.last_probe;
      const reason = b.reason || (p ? `${p.kind} probes answer` : "");
      setText(f.reason, reason);
      f.reason.title = reason;
      setText(f.sessions, b.sessions_active);
      setText(f.probe, !p ? "–" : p.ok ? ms(p.latency_ms) : "failed");
      setText(f.fails, b.max_fails ? `${b.passive_fails}/${b.max_fails}` : `${b.passive_fails}`);
      const barred = b.barred_until_ms ? ` · barred until ${clock(b.barred_until_ms)}` : "";
      setText(f.foot, `${b.sessions_total} sessions in all · since ${clock(b.since_ms)}${barred}`);
      sparkline(f.spark, b.probe_history, 60);
      f.actions.hidden = !st.admin;
      if (st.admin) {
        for (const btn of f.actions.children) {
          const a = btn.dataset.action;
          btn.disabled = btn.dataset.busy === "1" ||
            (a === "enable" && b.admin === "enabled") || (a !== "enable" && b.admin === (a === "disable" ? "disabled" : "draining"));
        }
      }
    }
  }

  /** Probe latencies as a trace over a fixed number of slots; failed probes as red ticks. */
  function sparkline(svg, values, slots) {
    const W = 200, H = 34, top = 3, bottom = H - 3;
    const max = Math.max(1, ...values.filter((v) => v !== null));
    const x = (i) => ((slots - values.length + i) * W) / (slots - 1);
    const y = (v) => bottom - ((bottom - top) * v) / max;
    let d = "", area = "", run = [];
    const flush = () => {
      if (run.length) {
        area += `M${run[0][0]},${bottom}` + run.map(([a, b]) => `L${a},${b}`).join("") + `L${run[run.length - 1][0]},${bottom}Z`;
        d += run.map(([a, b], i) => `${i ? "L" : "M"}${a},${b}`).join("");
      }
      run = [];
    };
    const fails = [];
    values.forEach((v, i) => {
      if (v === null) { flush(); fails.push(x(i)); } else run.push([x(i).toFixed(1), y(v).toFixed(1)]);
    });
    flush();
    const parts = [s("line", { class: "base", x1: 0, y1: bottom, x2: W, y2: bottom, "vector-effect": "non-scaling-stroke" }),
      s("path", { class: "area", d: area || "M0,0" }),
      s("path", { class: "trace", d: d || "M0,0", "vector-effect": "non-scaling-stroke" })];
    for (const fx of fails) parts.push(s("rect", { class: "fail", x: Math.max(0, fx - 1.5), y: H - 12, width: 3, height: 12 }));
    const title = s("title", {}, `probe latency, last ${values.length} probes; max ${ms(max)}`);
    svg.replaceChildren(title, ...parts);
  }

  // ---- clients ---------------------------------------------------------------------

  /** A persistent session: where it lives (after a failover, where meshgate recreated it). */
  function sessionText(c) {
    if (!c.persistent) return "clean";
    let t = `kept on ${c.session_home ?? c.broker}`;
    if (c.standby) t += ` · standby ${c.standby}`;
    return t;
  }

  function sessionTitle(c) {
    if (!c.persistent) return "clean session: nothing is kept after it disconnects";
    return `persistent session, ${c.subscriptions ?? 0} subscription(s) recorded by meshgate`;
  }

  function brokerOptions(brokers) {
    const sel = $("client-broker");
    const keep = sel.value;
    sel.replaceChildren(h("option", { value: "" }, "all brokers"), ...brokers.map((b) => h("option", { value: b.name }, b.name)));
    sel.value = brokers.some((b) => b.name === keep) ? keep : "";
  }

  function renderClients() {
    if (!state) return;
    const q = $("client-search").value.trim().toLowerCase();
    const only = $("client-broker").value;
    const now = state.at_ms;
    const rows = [];
    let shown = 0;
    // Newest first: the session someone just connected is the one they look for.
    for (let i = state.clients.length - 1; i >= 0; i--) {
      const c = state.clients[i];
      if (only && c.broker !== only) continue;
      if (q && ![c.client_id, c.username || "", c.peer].some((v) => v.toLowerCase().includes(q))) continue;
      shown++;
      if (rows.length >= 300) continue; // enough rows to scroll through; the count says the rest
      rows.push(h("tr", { "data-client-id": c.client_id, class: c.closing ? "closing" : null },
        h("td", { class: "id", title: c.client_id }, c.client_id || "(empty)"),
        h("td", {}, c.broker),
        h("td", {}, c.username ?? "–"),
        h("td", {}, c.protocol),
        h("td", {}, c.peer),
        h("td", { class: "r", title: c.connected_at }, duration((now - c.connected_at_ms) / 1000)),
        h("td", { class: "r" }, bytes(c.bytes_in)),
        h("td", { class: "r" }, bytes(c.bytes_out)),
        h("td", { title: sessionTitle(c) }, sessionText(c))));
    }
    $("clients").tBodies[0].replaceChildren(...rows);
    const total = state.clients_total;
    let count = `${total}`;
    if (q || only) count = `${shown} of ${total}`;
    else if (state.clients.length < total) count = `newest ${state.clients.length} of ${total}`;
    setText($("clients-count"), count);
    $("clients-empty").hidden = shown > 0;
    setText($("clients-empty"), total ? "No client matches." : "No client connected.");
  }

  $("client-search").addEventListener("input", renderClients);
  $("client-broker").addEventListener("change", renderClients);

  // ---- events ----------------------------------------------------------------------

  /** Short names for the event kinds, so the badge column stays narrow. */
  const KIND_LABELS = {
    state_change: "state", failover: "failover", passive_bar: "barred", passive_reopen: "reopened",
    drain: "drain", admin: "admin", reload: "reload", session_closed: "closed", switch: "switch", replication: "repl",
    nginx_reload: "nginx",
  };

  function renderEvents(changed) {
    if (!changed) return;
    const items = [];
    for (let i = events.length - 1; i >= 0; i--) {
      const e = events[i];
      items.push(h("li", { "data-seq": e.seq },
        h("time", { datetime: new Date(e.at_ms).toISOString() }, clock(e.at_ms)),
        h("span", { class: "kind", "data-kind": e.kind, title: e.kind }, KIND_LABELS[e.kind] || e.kind),
        h("span", { class: "msg" }, e.message)));
    }
    if (!items.length) items.push(h("li", { class: "muted none" }, "Nothing has happened yet."));
    $("events").replaceChildren(...items);
  }

  // ---- TCP check ---------------------------------------------------------------------

  let tcpBusy = false;
  async function tcpCheck() {
    if (tcpBusy || document.visibilityState === "hidden") return;
    tcpBusy = true;
    $("tcp-run").disabled = true;
    try {
      const r = await fetch("/tcp-check", { cache: "no-store" });
      const list = await r.json();
      $("tcp").tBodies[0].replaceChildren(...list.map((t) => h("tr", {},
        h("td", {}, t.name),
        h("td", { class: "muted" }, t.address),
        h("td", { class: `result ${t.ok ? "ok" : "bad"}`, title: t.error || "" }, t.ok ? "connects" : t.error),
        h("td", { class: "r" }, t.ok ? ms(t.latency_ms) : "–"))));
      setText($("tcp-at"), `at ${clock(Date.now())}`);
    } catch (e) {
      setText($("tcp-at"), "unreachable");
    } finally {
      tcpBusy = false;
      $("tcp-run").disabled = false;
    }
  }
  $("tcp-run").addEventListener("click", tcpCheck);
  setInterval(tcpCheck, TCP_EVERY_MS);

  // ---- replication -----------------------------------------------------------------

  /** Keeps, per broker, the worst lag of the copies reaching it, one point per new measurement. */
  function recordLag(repl) {
    if (!repl) return;
    for (const link of repl.links) {
      const into = repl.lag.filter((l) => l.to === link.broker);
      if (!into.length) continue;
      const at = Math.max(...into.map((l) => l.at_ms));
      const hist = lagHistory.get(link.broker) || [];
      if (!hist.length || hist[hist.length - 1].at !== at) hist.push({ at, ms: Math.max(...into.map((l) => l.lag_ms)) });
      if (hist.length > LAG_POINTS) hist.shift();
      lagHistory.set(link.broker, hist);
    }
  }

  /** One row per link (meshgate to a broker) with the lag into it over time, then every pair. */
  function renderReplication(repl) {
    const box = $("repl");
    if (!repl) {
      if (!box.dataset.off) {
        box.dataset.off = "1";
        box.replaceChildren(h("p", { class: "muted" }, "Replication does not run in this meshgate."));
      }
      return;
    }
    delete box.dataset.off;
    const links = repl.links.map((l) => {
      const chart = s("svg", { class: "spark", viewBox: "0 0 200 34", preserveAspectRatio: "none", "aria-hidden": "true" });
      sparkline(chart, (lagHistory.get(l.broker) || []).map((p) => p.ms), LAG_POINTS);
      return h("tr", {},
        h("td", {}, l.broker),
        h("td", { class: l.connected ? "ok" : "bad" }, l.connected ? "linked" : "down"),
        h("td", { class: "r" }, l.received),
        h("td", { class: "r" }, ms(maxLagInto(repl, l.broker))),
        h("td", { class: "chart" }, chart));
    });
    const names = repl.links.map((l) => l.broker);
    const pair = new Map(repl.lag.map((l) => [`${l.from}>${l.to}`, l.lag_ms]));
    const matrix = h("table", { class: "grid matrix" },
      h("thead", {}, h("tr", {}, h("th", {}, "from ↓ to →"), ...names.map((n) => h("th", { class: "r" }, n)))),
      h("tbody", {}, ...names.map((from) => h("tr", {}, h("th", {}, from),
        ...names.map((to) => h("td", { class: "r" }, from === to ? "" : ms(pair.get(`${from}>${to}`))))))));
    box.replaceChildren(
      h("div", { class: "scroll" }, h("table", { class: "grid" },
        h("thead", {}, h("tr", {}, h("th", {}, "link"), h("th", {}, "state"), h("th", { class: "r" }, "received"),
          h("th", { class: "r" }, "max lag into"), h("th", {}, "history"))),
        h("tbody", {}, ...links))),
      h("div", { class: "scroll" }, matrix),
      h("p", { class: "muted" }, `${repl.retained_topics} retained topics · ${repl.tombstones} tombstones`));
  }

  // ---- instances ([coordination]) ------------------------------------------------------

  /** Every instance as GET /instances shows it, and this instance's etcd session; the
   *  panel stays hidden without [coordination]. */
  function renderInstances(view, now) {
    const panel = $("instances-panel");
    panel.hidden = !view;
    if (!view) return;
    const co = view.coordination;
    const pill = $("etcd-state");
    pill.dataset.status = co.state;
    setText(pill, co.state === "ok" ? "up" : co.state);
    const session = co.state === "ok"
      ? `session live · lease ${co.lease_ttl_s} s`
      : `degraded: ${co.reason || "unknown"} · serving clients with what this instance knows`;
    const queued = co.claims_queued ? ` · ${co.claims_queued} claim(s) queued` : "";
    setText($("etcd-line"), `${co.etcd.join(", ")} · ${session}${queued} · leader: ${co.leader ?? "none"}`);
    setText($("instances-count"), `${view.instances.length}`);
    $("instances").tBodies[0].replaceChildren(...view.instances.map((i) => {
      const role = (i.leader ? "★ leads replication" : "standby") + (i.self ? " · this one" : "");
      return h("tr", { "data-instance": i.name, "data-leader": String(i.leader), "data-self": String(i.self) },
        h("td", {}, i.name),
        h("td", {}, role),
        h("td", {}, i.mqtt),
        h("td", {}, i.http),
        h("td", {}, i.version),
        // Listed while its etcd lease is renewed: a dead instance leaves lease_ttl after its last renewal.
        h("td", { class: "r", title: `started ${new Date(i.started_ms).toISOString()}` }, duration((now - i.started_ms) / 1000)));
    }));
  }

  // ---- admin actions -----------------------------------------------------------------

  let toastTimer = 0;
  function toast(text) {
    const t = $("toast");
    setText(t, text);
    t.classList.add("show");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => t.classList.remove("show"), 4000);
  }

  /** The admin token: from this tab's sessionStorage, or asked for once. */
  function token() {
    const kept = sessionStorage.getItem(TOKEN_KEY);
    if (kept) return Promise.resolve(kept);
    const dialog = $("token-dialog"), form = $("token-form"), input = $("token-input");
    input.value = "";
    return new Promise((resolve) => {
      const done = (value) => {
        form.onsubmit = null;
        $("token-cancel").onclick = null;
        dialog.onclose = null;
        if (dialog.open) dialog.close();
        resolve(value);
      };
      form.onsubmit = (e) => {
        e.preventDefault();
        const t = input.value.trim();
        if (t) sessionStorage.setItem(TOKEN_KEY, t);
        done(t || null);
      };
      $("token-cancel").onclick = () => done(null);
      dialog.onclose = () => done(null);
      dialog.showModal();
      input.focus();
    });
  }

  async function admin(name, action, btn) {
    const warn = {
      disable: `Disable ${name}? Its open sessions move to another broker now (switched under their clients' connections, or closed with [proxy] move = "close").`,
      drain: `Drain ${name}? Its sessions are moved away at the failback rate.`,
    }[action];
    if (warn && !confirm(warn)) return;
    const t = await token();
    if (!t) return;
    btn.dataset.busy = "1";
    btn.disabled = true;
    try {
      const r = await fetch(`/brokers/${encodeURIComponent(name)}/${action}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${t}` },
      });
      const body = await r.json().catch(() => ({}));
      if (r.ok) {
        toast(`${name}: ${body.state || action}`);
      } else {
        if (r.status === 401) sessionStorage.removeItem(TOKEN_KEY);
        toast(`${action} ${name} failed: ${body.error || r.status}`);
      }
    } catch (e) {
      toast(`${action} ${name} failed: meshgate unreachable`);
    } finally {
      delete btn.dataset.busy;
      btn.disabled = false;
    }
  }

  // ---- start -------------------------------------------------------------------------

  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued) return;
    resizeQueued = true;
    requestAnimationFrame(() => { resizeQueued = false; renderTopology(); });
  });
  renderEvents(true);
  connect();
  tcpCheck();
})();
