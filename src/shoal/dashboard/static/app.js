// shoal dashboard: renders a run's state (GET /api/state, then server-sent events from
// /api/events) with uPlot. The HTML report embeds the same script with the state inlined in
// a JSON script element (id "shoal-data") and no server behind it.
// Everything from the server is put on the page with textContent, never parsed as HTML:
// device attributes and rejection reasons come from devices.
"use strict";

(function () {
  let REPORT = false;  // set by start(): the page carries its state (the HTML report)
  const model = { info: {}, rows: [], base: 0, snap: null, audit: [], auditBase: 0 };
  const charts = {};
  let registryOffset = 0;
  let lastVersionsFetch = -1;

  // -- small DOM helpers --------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function fill(id, ...children) {
    const node = document.getElementById(id);
    node.replaceChildren(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
    if (digits === undefined) return Number.isInteger(v) ? v.toLocaleString("en") : v.toFixed(4);
    return v.toFixed(digits);
  }

  function prec(v) {  // a p-value: two significant digits
    return typeof v === "number" && Number.isFinite(v) ? v.toPrecision(2) : "n/a";
  }

  function mb(bytes) {
    return bytes === null || bytes === undefined ? "n/a" : (bytes / 1e6).toFixed(3) + " MB";
  }

  function when(t) {
    return t ? new Date(t * 1000).toLocaleString() : "never";
  }

  function card(label, value, id) {
    return el("div", { class: "card" }, el("div", { class: "label" }, label),
              el("div", { class: "value", id: id || "" }, value));
  }

  function table(id, head, rows, rowClass) {
    const thead = el("tr", {}, ...head.map((h) => el("th", {}, h)));
    const body = rows.map((r, i) => el("tr", { class: rowClass ? rowClass(i) : "" },
      ...r.map((c) => (c instanceof Node ? el("td", {}, c)
        : el("td", { class: typeof c === "number" ? "num" : "" },
             typeof c === "number" ? num(c) : c)))));
    if (!rows.length) body.push(el("tr", {}, el("td", { colSpan: head.length, class: "muted" },
                                                  "none")));
    return fill(id, thead, ...body);
  }

  function counterRows(obj) {
    return Object.entries(obj || {}).sort((a, b) => b[1] - a[1]);
  }

  // -- the rows' columns ----------------------------------------------------------------------

  const col = (name) => model.rows.map((r) => (r[name] === undefined ? null : r[name]));
  const trained = () => model.rows.filter((r) => r.round > 0);

  function prefixed(prefix) {
    const keys = new Set();
    for (const r of model.rows) for (const k of Object.keys(r)) if (k.startsWith(prefix)) keys.add(k);
    return [...keys].sort();
  }

  function lastWith(name) {
    for (let i = model.rows.length - 1; i >= 0; i--) {
      const v = model.rows[i][name];
      if (v !== undefined && v !== null) return v;
    }
    return null;
  }

  // -- charts -----------------------------------------------------------------------------------

  const COLORS = ["#2f6fdf", "#c0362c", "#888", "#1f8a4c", "#b7791f", "#7e3fbf"];

  function chart(id, xs, series, axes, xLabel) {
    const target = document.getElementById(id);
    const present = series.filter((s) => s.values.some((v) => v !== null));
    if (!present.length || !xs.length) {
      if (charts[id]) { charts[id].destroy(); delete charts[id]; }
      target.replaceChildren(el("div", { class: "empty" }, "no data yet"));
      return;
    }
    const data = [xs, ...present.map((s) => s.values)];
    const key = present.map((s) => s.label).join("|");
    if (charts[id] && charts[id].key === key) {
      charts[id].plot.setData(data);
      return;
    }
    if (charts[id]) charts[id].plot.destroy();
    target.replaceChildren();
    const width = Math.max(320, Math.min(1040, (document.querySelector("main").clientWidth || 900) - 40));
    const xName = xLabel || (model.info.policy === "buffered" ? "server step" : "round");
    const opts = {
      width, height: 240,
      scales: { x: { time: false } },
      series: [{ label: xName },
        ...present.map((s, i) => ({ label: s.label, stroke: s.color || COLORS[i % COLORS.length],
                                    width: 2, scale: s.scale || "y", spanGaps: true,
                                    dash: s.dash, points: { show: xs.length < 60 } }))],
      axes: [{ label: xName,
                incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 1e5, 1e6] },
        ...(axes || [{ scale: "y" }])],
    };
    charts[id] = { key, plot: new uPlot(opts, data, target) };
  }

  function renderCharts() {
    const rounds = col("round");
    chart("chart-quality", rounds, [
      { label: "test accuracy", values: col("eval_accuracy") },
      { label: "test loss", values: col("eval_loss"), scale: "loss" },
      { label: "mean local training loss", values: col("train_loss"), scale: "loss", color: "#888" },
    ], [{ scale: "y", label: "accuracy" }, { scale: "loss", side: 1, label: "cross-entropy", grid: { show: false } }]);
    const t = trained();
    const tr = t.map((r) => r.round);
    const tc = (name) => t.map((r) => (r[name] === undefined ? null : r[name]));
    chart("chart-phases", tr, [
      { label: "collect (s)", values: tc("seconds") },
      { label: "commit (s)", values: tc("phase_commit_s") },
    ], [{ scale: "y", label: "seconds" }]);
    chart("chart-devices", tr, [
      { label: "sampled", values: tc("sampled") },
      { label: "accepted", values: tc("accepted") },
      { label: "rejected or lost", values: tc("rejected") },
    ], [{ scale: "y", label: "clients" }]);
    chart("chart-staleness", tr, [
      { label: "max staleness", values: tc("staleness_max") },
      { label: "mean staleness", values: tc("staleness_mean") },
    ], [{ scale: "y", label: "versions" }]);
    const most = t.reduce((m, r) => Math.max(m, r.bytes_up || 0, r.bytes_down || 0), 0);
    const [unit, scale] = most >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
    chart("chart-bytes", tr, [
      { label: `${unit} up`, values: t.map((r) => r.bytes_up / scale) },
      { label: `${unit} down`, values: t.map((r) => r.bytes_down / scale) },
    ], [{ scale: "y", label: unit }]);
    const params = model.info.num_params;
    chart("chart-ratio", tr, [{ label: "compression ratio", values: t.map((r) =>
      (params && r.accepted && r.bytes_up ? r.bytes_up / (r.accepted * 4 * params) : null)) }],
    [{ scale: "y", label: "ratio" }]);
    const budget = model.info.epsilon_budget;
    chart("chart-epsilon", tr, [
      { label: "ε spent", values: tc("privacy_epsilon") },
      ...(budget > 0 ? [{ label: "budget", values: t.map(() => budget), color: "#c0362c", dash: [6, 4] }] : []),
    ], [{ scale: "y", label: "ε" }]);
    chart("chart-clip", tr, [{ label: "clip norm", values: tc("privacy_clip_norm") }],
          [{ scale: "y", label: "L2 norm" }]);
    if (model.snap.edges) {
      const big = t.reduce((m, r) => Math.max(m, r.privacy_edge_ingress_bytes || 0), most);
      const [eu, es] = big >= 1e6 ? ["MB", 1e6] : ["kB", 1e3];
      chart("chart-edge-bytes", tr, [
        { label: `${eu} at the global server`, values: t.map((r) => r.bytes_up / es) },
        { label: `${eu} devices to edges`, values: tc("privacy_edge_ingress_bytes").map((v) => (v === null ? null : v / es)) },
      ], [{ scale: "y", label: eu }]);
      chart("chart-edge-uploads", tr, [
        { label: "edge uploads", values: tc("edge_uploads") },
        { label: "edges failed", values: tc("edge_failed"), color: "#c0362c" },
      ], [{ scale: "y", label: "edges" }]);
    }
    const c = model.snap.canary;
    if (c) {
      const evs = c.evaluations;
      const arm = (e, a, k) => (e[a] && e[a].metrics && e[a].metrics[k] !== undefined ? e[a].metrics[k] : null);
      chart("chart-canary", evs.map((e) => e.number), [
        { label: `candidate v${c.candidate} loss`, values: evs.map((e) => arm(e, "candidate", "loss")), color: "#c0362c" },
        { label: `production v${c.production} loss`, values: evs.map((e) => arm(e, "production", "loss")), color: "#2f6fdf" },
      ], [{ scale: "y", label: "loss" }], "evaluation");
    }
  }

  // -- pages ------------------------------------------------------------------------------------

  function renderHeader() {
    const i = model.info;
    const s = model.snap;
    fill("run-name", i.name || "");
    fill("run-what", `${i.strategy} · ${i.model} · ${i.dataset} · ${num(i.clients)} clients, ` +
         `${num(i.per_round)} per round · ${i.mode}`);
    const status = fill("run-status", s.status + (s.detail ? ` (${s.detail})` : ""));
    status.className = "status " + s.status;
  }

  function renderOverview() {
    const s = model.snap;
    const unit = model.info.policy === "buffered" ? "server step" : "round";
    fill("overview-cards",
      card("state", s.status),
      card("version", `${num(s.version)} of ${num(model.info.rounds)}`, "current-version"),
      card(`open ${unit}`, REPORT || s.status === "finished" ? "none" : num(s.open.round)),
      card("test accuracy", num(lastWith("eval_accuracy")), "last-accuracy"),
      card("test loss", num(lastWith("eval_loss"))),
      card("updates accepted", num(model.rows.reduce((a, r) => a + (r.accepted || 0), 0))),
      card("rounds shown", num(model.rows.length), "rounds-shown"));
    const recent = REPORT ? model.rows : model.rows.slice(-15).reverse();
    table("rounds-table", [unit, "version", "accuracy", "loss", "train loss", "sampled",
                           "accepted", "rejected", "closed by", "seconds"],
          recent.map((r) => [r.round, r.version, num(r.eval_accuracy), num(r.eval_loss),
                             num(r.train_loss), r.sampled, r.accepted, r.rejected,
                             r.closed_by || (r.round === 0 ? "initial model" : ""), num(r.seconds, 2)]));
  }

  function renderDevices() {
    const s = model.snap;
    const o = s.open || {};
    fill("device-cards",
      card("clients", num(model.info.clients)),
      card("per round", num(model.info.per_round)),
      card("asked in total", num(REPORT ? model.rows.reduce((a, r) => a + (r.sampled || 0), 0) : s.totals.asked || 0)),
      card("uploads in progress", num(s.active_uploads || 0)));
    table("open-table", ["round", "tasks", "asked", "accepted", "rejected", "dropped"],
          REPORT || s.status === "finished" ? [] :
            [[o.round, o.tasks, o.asked, o.accepted,
              counterRows(o.rejected).map(([k, v]) => `${k} ${v}`).join(", ") || "0",
              counterRows(o.failed).map(([k, v]) => `${k} ${v}`).join(", ") || "0"]]);
    // totals by reason: live counters when the hooks reported them, else the rows' columns
    let rejected = s.rejected;
    if (!Object.keys(rejected || {}).length) {
      rejected = {};
      for (const k of prefixed("rejected_")) rejected[k.slice(9)] = col(k).reduce((a, v) => a + (v || 0), 0);
    }
    table("rejected-table", ["reason", "updates"], counterRows(rejected));
    table("failed-table", ["reason", "clients"], counterRows(s.failed));
    table("checkins-table", ["answer", "check-ins"], counterRows(s.checkins));
    table("refused-table", ["reason", "calls"], counterRows(s.refused));
  }

  function renderTraffic() {
    const s = model.snap;
    const t = trained();
    const up = t.reduce((a, r) => a + (r.bytes_up || 0), 0);
    const down = t.reduce((a, r) => a + (r.bytes_down || 0), 0);
    fill("traffic-cards",
      card("uploaded (accepted updates)", mb(up)),
      card("downloaded (models)", mb(down)),
      card("per round up", mb(t.length ? up / t.length : null)),
      card("per round down", mb(t.length ? down / t.length : null)),
      ...(REPORT ? [] : [card("carrier bytes up", mb(s.totals.bytes_up || 0)),
                         card("carrier bytes down", mb(s.totals.bytes_down || 0))]),
      card("parameters", model.info.num_params ? num(model.info.num_params) : "unknown"));
  }

  function renderPrivacy() {
    const i = model.info;
    const eps = lastWith("privacy_epsilon");
    fill("privacy-cards",
      card("differential privacy", i.dp),
      card("ε spent", num(eps), "epsilon-spent"),
      card("ε budget", i.epsilon_budget > 0 ? num(i.epsilon_budget) : "none"),
      card("ε left", i.epsilon_budget > 0 && eps !== null ? num(Math.max(i.epsilon_budget - eps, 0)) : "n/a"),
      card("clip norm", num(lastWith("privacy_clip_norm"))),
      card("secure aggregation", i.secure_aggregation ? "SecAgg+" : "off"));
    const stages = prefixed("privacy_secagg_dropped_at_");
    const totals = stages.map((k) => [k.slice("privacy_secagg_dropped_at_".length),
                                      col(k).reduce((a, v) => a + (v || 0), 0)]);
    // the live hook's count, for stages the rows do not name yet
    for (const [stage, n] of counterRows(model.snap.dropouts))
      if (!totals.some(([k]) => k === stage)) totals.push([stage, n]);
    table("dropouts-table", ["stage", "clients lost"], totals);
  }

  function auditDetail(e) {
    const rest = Object.entries(e).filter(([k]) => k !== "at" && k !== "action");
    return rest.map(([k, v]) => `${k}=${typeof v === "object" && v !== null ? JSON.stringify(v) : v}`).join(" ");
  }

  function renderCanary() {
    const c = model.snap.canary;
    table("audit-table", ["when", "action", "details"],
          model.audit.slice(-200).reverse().map((e) => [when(e.at), e.action, auditDetail(e)]));
    if (!c) {
      fill("canary-note", REPORT || model.info.mode === "replay"
        ? "No canary rollout in this run's audit log (audit.jsonl)."
        : "No canary rollout: `shoal launch --canary VERSION` runs one and shows it here.");
      fill("canary-cards");
      fill("canary-reason");
      table("canary-table", ["evaluation"], []);
      return;
    }
    fill("canary-note", `salt ${c.salt} · started ${when(c.started)}` +
         (c.decided ? ` · decided ${when(c.decided)}` : ""));
    const r = c.rule || {};
    fill("canary-cards",
      card("candidate", `v${c.candidate}`, "canary-candidate"),
      card("production", `v${c.production}`, "canary-production"),
      card("canary fraction", num(c.fraction, 2), "canary-fraction"),
      card("decision", c.decision, "canary-decision"),
      card("evaluation rounds", num(c.evaluations.length), "canary-rounds"),
      card("rule", `${r.metric ?? "loss"}: ≥ ${r.min_clients ?? "?"} clients per arm, ` +
                   `α ${r.alpha ?? "?"}, margin ${r.margin ?? "?"}, ≤ ${r.max_rounds ?? "?"} rounds`));
    document.getElementById("canary-decision").className = "value decision " + c.decision.replace(" ", "-");
    fill("canary-reason", c.reason);
    const arm = (e, a) => e[a] || {};
    const m = (e, a, k) => (arm(e, a).metrics || {})[k];
    const who = (e, a) => {  // clients, and how many of their losses the rule's cap cut
      const x = arm(e, a);
      return x.clipped ? `${x.clients} (${x.clipped} cut)` : x.clients;
    };
    table("canary-table", ["#", "candidate clients", "candidate loss", "candidate accuracy",
                           "production clients", "production loss", "production accuracy",
                           "clients so far (cand. / prod.)", "z", "p worse", "p not worse", "verdict"],
          c.evaluations.map((e) => [e.number, who(e, "candidate"), num(m(e, "candidate", "loss")),
                                    num(m(e, "candidate", "accuracy")), who(e, "production"),
                                    num(m(e, "production", "loss")), num(m(e, "production", "accuracy")),
                                    `${e.n_candidate} / ${e.n_production}`, num(e.z, 2),
                                    prec(e.p_worse), prec(e.p_not_worse),
                                    e.verdict]));
  }

  function renderEdges() {
    const v = model.snap.edges;
    if (!v) {
      fill("edges-note", "No edge aggregators in this run (hierarchy.edges = 0).");
      fill("edge-cards");
      table("edges-table", ["edge"], []);
      table("edge-failures-table", ["round"], []);
      return;
    }
    const t = trained();
    // the global's own count of what reached it; the edges' count of what their devices
    // sent them (failed edges' groups included: those bytes moved too)
    const atGlobal = t.reduce((a, r) => a + (r.bytes_up || 0), 0);
    const fromDevices = v.edges.reduce((a, e) => a + (e.device_bytes || 0), 0);
    fill("edges-note", `${num(v.reports)} edge reports; the ring gives each device one edge ` +
         "and moves a failed edge's devices to the next live edges.");
    fill("edge-cards",
      card("edges", num(v.edges.length), "edge-count"),
      card("failed", num(v.failures.length), "edge-failed"),
      card("bytes at the global server", mb(atGlobal), "edge-global-bytes"),
      card("bytes from devices to edges", mb(fromDevices), "edge-device-bytes"),
      card("global / device bytes", fromDevices ? num(atGlobal / fromDevices, 3) : "n/a", "edge-ratio"));
    table("edges-table", ["edge", "devices", "tasks", "uploads", "clients asked",
                          "updates uploaded", "MB from devices", "MB up", "failed in round",
                          "devices moved out", "devices moved in"],
          v.edges.map((e) => [e.edge, e.assigned, e.tasks, e.uploads, e.asked, e.accepted,
                              num(e.device_bytes / 1e6, 3), num(e.upload_bytes / 1e6, 3),
                              e.failed_round === null ? "-" : e.failed_round, e.moved_out, e.moved_in]),
          (i) => (v.edges[i].failed_round === null ? "" : "failed"));
    table("edge-failures-table", ["round", "edge", "devices moved", "moved to"],
          v.failures.map((f) => [f.round, f.edge, f.moved,
                                 Object.entries(f.moved_to).map(([k, n]) => `${k} ${n}`).join(", ") || "-"]));
  }

  // -- registry and versions (live only) --------------------------------------------------------

  async function getJSON(url) {
    const r = await fetch(url, { headers: { accept: "application/json" } });
    return r.json();
  }

  async function renderRegistry() {
    const page = await getJSON(`/api/devices?offset=${registryOffset}&limit=25`);
    if (!page.available) {
      fill("registry-note", "No registry here: a simulation (live or replayed) has virtual clients.");
      table("registry-table", ["device"], []);
      return;
    }
    fill("registry-note", `${num(page.total)} enrolled, ${num(page.online)} online ` +
         `(seen in the last ${num(page.online_window_s, 0)} s)`);
    table("registry-table", ["device", "attributes", "windows (min of week, UTC)", "last seen",
                             "participation", "recent outcomes"],
          page.devices.map((d) => [d.id,
            Object.entries(d.attributes).map(([k, v]) => `${k}=${v}`).join(", "),
            d.windows.map((w) => `${w[0]}-${w[1]}`).join(", ") || "always",
            (d.online ? "online · " : "") + when(d.last_seen), d.participation,
            d.outcomes.map((x) => `${x.round}: ${x.outcome}`).join(", ")]));
    fill("registry-range", `${page.offset + 1}-${page.offset + page.devices.length} of ${page.total}`);
    document.getElementById("registry-prev").disabled = page.offset === 0;
    document.getElementById("registry-next").disabled = page.offset + page.devices.length >= page.total;
  }

  function message(text, ok) {
    const m = fill("action-message", text);
    m.className = ok ? "ok" : "error";
  }

  async function act(action, version) {
    const token = document.getElementById("token").value.trim();
    const r = await fetch(`/api/versions/${version}/${action}`, {
      method: "POST", body: "{}",
      headers: { "content-type": "application/json", accept: "application/json",
                 ...(token ? { authorization: `Bearer ${token}` } : {}) },
    });
    const body = await r.json();
    if (!r.ok) { message(`${action} v${version} refused: ${body.error}`, false); return; }
    message(`${action} v${version}: production is now v${body.production}`, true);
    renderVersions(body);
  }

  function renderVersions(listing) {
    if (!listing.available) {
      fill("version-cards", card("model store", "not attached"));
      table("versions-table", ["version"], []);
      table("history-table", ["when"], []);
      return;
    }
    fill("version-cards",
      card("production", listing.production === null ? "none" : `v${listing.production}`, "production"),
      card("versions", num(listing.versions.length)));
    const buttons = (v) => {
      const span = el("span", {});
      if (v.status !== "production" && v.status !== "rolled_back") {
        span.append(el("button", { type: "button", "data-action": "promote", "data-version": v.id,
                                   onclick: () => act("promote", v.id) }, "promote"), " ");
      }
      if (listing.production !== null && v.status !== "production" && v.status !== "rolled_back") {
        span.append(el("button", { type: "button", "data-action": "rollback", "data-version": v.id,
                                   onclick: () => act("rollback", v.id) }, "roll back to"));
      }
      return span;
    };
    const shown = listing.versions.slice(0, 50);
    table("versions-table", ["version", "parent", "round", "status", "created", "metrics", ""],
          shown.map((v) => [`v${v.id}`, v.parent === null ? "-" : `v${v.parent}`, v.round,
                            v.status, when(v.created),
                            Object.entries(v.metrics).map(([k, x]) => `${k} ${num(x)}`).join(", "),
                            buttons(v)]),
          (i) => shown[i].status);
    table("history-table", ["when", "action", "version", "previous"],
          listing.history.slice().reverse().map((e) => [when(e.at), e.action, `v${e.version}`,
                                                        e.previous === null ? "-" : `v${e.previous}`]));
  }

  async function refreshVersions() {
    lastVersionsFetch = model.snap.version;
    renderVersions(await getJSON("/api/versions"));
  }

  // -- state ------------------------------------------------------------------------------------

  function merge(snap) {
    model.snap = snap;
    model.info = snap.info;
    if (!model.rows.length) model.base = snap.first;
    snap.rows.forEach((row, k) => {
      const idx = snap.first + k - model.base;
      if (idx < model.rows.length) model.rows[idx] = row;
      else model.rows.push(row);
    });
    const keep = Math.max(0, snap.next - model.base);
    if (model.rows.length > keep) model.rows.length = keep;
    if (!model.audit.length) model.auditBase = snap.audit_first;
    snap.audit.forEach((entry, k) => {
      const idx = snap.audit_first + k - model.auditBase;
      if (idx < model.audit.length) model.audit[idx] = entry;
      else model.audit.push(entry);
    });
    render();
  }

  function render() {
    renderHeader();
    renderOverview();
    renderDevices();
    renderTraffic();
    renderPrivacy();
    renderCanary();
    renderEdges();
    if (REPORT) {  // a report leaves out the pages of features the run did not use
      document.getElementById("page-canary").hidden = !model.snap.canary;
      document.getElementById("page-edges").hidden = !model.snap.edges;
    }
    renderCharts();
    if (!REPORT && model.snap.version !== lastVersionsFetch) refreshVersions();
  }

  function connect() {
    const since = model.base + model.rows.length;
    const auditSince = model.auditBase + model.audit.length;
    const source = new EventSource(`/api/events?since=${since}&audit_since=${auditSince}`);
    source.addEventListener("state", (ev) => {
      fill("conn", "live");
      merge(JSON.parse(ev.data));
    });
    source.onerror = () => {
      fill("conn", "reconnecting…");
      source.close();
      setTimeout(connect, 2000);
    };
  }

  function showPage() {
    const name = (location.hash || "#overview").slice(1);
    for (const p of document.querySelectorAll(".page")) p.classList.toggle("active", p.id === `page-${name}`);
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
    if (name === "devices") renderRegistry();
  }

  async function start() {
    const embedded = document.getElementById("shoal-data");
    REPORT = embedded !== null;
    if (REPORT) {
      document.body.classList.add("report");
      merge(JSON.parse(embedded.textContent));
      return;
    }
    window.addEventListener("hashchange", showPage);
    showPage();
    const token = document.getElementById("token");
    token.value = sessionStorage.getItem("shoal-operator-token") || "";
    token.addEventListener("input", () => sessionStorage.setItem("shoal-operator-token", token.value));
    document.getElementById("token-form").addEventListener("submit", (e) => e.preventDefault());
    document.getElementById("registry-prev").addEventListener("click", () => {
      registryOffset = Math.max(0, registryOffset - 25); renderRegistry();
    });
    document.getElementById("registry-next").addEventListener("click", () => {
      registryOffset += 25; renderRegistry();
    });
    merge(await getJSON("/api/state"));
    if (!location.hash && model.snap.canary && !model.rows.length) location.hash = "#canary";
    connect();
    setInterval(() => { if (location.hash === "#versions") refreshVersions(); }, 10000);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
