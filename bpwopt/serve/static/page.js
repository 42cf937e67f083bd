// bpwopt serve's page: the state's trade-off curve, a control that snaps to it, the plan at that point, jobs.
// Everything comes from the JSON API of the same server (see /docs); nothing is loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let front = null;      // GET /api/states/{id}/front of the chosen state
let plan = null;       // the last POST /api/plans answer shown
let target = null;     // the plan last asked for: {target_bpw} or {target_size}
let planning = false;  // a plan request is on its way: the newest target is asked when it is answered
let replanTimer = null;
// Presets named on the curve (the rest are markers with their names on hover): the sizes people pick.
const COMMON_PRESETS = new Set(["Q2_K", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]);

async function api(path, options = {}) {
  const response = await fetch(path, {
    headers: { "Content-Type": "application/json" }, credentials: "same-origin", ...options,
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = Array.isArray(body.detail) ? body.detail.map((d) => d.msg).join("; ") : body.detail;
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

function showError(where, error) {
  where.textContent = error.message;
  where.classList.add("error");
}

function selection() {
  return { state: $("state").value, model: $("model").value, imatrix: $("imatrix").value || null,
           allow_requantize: true };
}

async function loadLists() {
  const [models, states] = await Promise.all([api("/api/models"), api("/api/states")]);
  $("model").replaceChildren(...models.map((m) => new Option(m.path, m.path)));
  $("imatrix").replaceChildren(new Option("none", ""), ...models.map((m) => new Option(m.path, m.path)));
  $("state").replaceChildren(...states.map((s) => new Option(`${s.path} (${s.measurements ?? "busy"} measured)`, s.id)));
  const byModel = new Map(models.map((m) => [m.path.split("/").pop().replace(/\.gguf$/, ""), m.path]));
  const first = states[0];
  if (first) {
    const stem = first.path.split("/").pop().replace(/\.bpw_state$/, "");
    if (byModel.has(stem)) $("model").value = byModel.get(stem);
    await loadFront();
  }
}

async function loadFront() {
  const note = $("note");
  note.classList.remove("error");
  try {
    front = await api(`/api/states/${$("state").value}/front?model=${encodeURIComponent($("model").value)}`);
  } catch (error) {
    front = null;
    showError(note, error);
    return;
  }
  note.textContent = front.note;
  drawCurve();
  const slider = $("bpw");
  slider.min = 0;
  slider.max = front.bits_per_weight.length - 1;
  slider.step = 1;
  slider.disabled = false;
  // Where the control was (a job's end redraws the curve), else at the state's last stored plan, else midway.
  const shown = Number($("bpw-value").dataset.bpw);
  const newest = front.plans[front.plans.length - 1];
  const at = shown || (newest && newest.bits_per_weight);
  slider.value = at ? nearestIndex(at) : Math.floor(front.bits_per_weight.length / 2);
  onSlide();
}

function nearestIndex(bpw) {
  let best = 0;
  front.bits_per_weight.forEach((x, i) => {
    if (Math.abs(x - bpw) < Math.abs(front.bits_per_weight[best] - bpw)) best = i;
  });
  return best;
}

function drawCurve() {
  const commonNames = (label) => label.split(" = ").filter((name) => COMMON_PRESETS.has(name)).join(" = ");
  const points = (list, name, symbol, textOf) => ({
    x: list.map((p) => p.bits_per_weight), y: list.map((p) => p.error), hovertext: list.map((p) => p.label),
    text: list.map((p) => (textOf ? textOf(p.label) : "")),
    customdata: list.map((p) => (p.kld == null ? "" : `KLD ${p.kld.toPrecision(4)} ± ${p.kld_stderr.toPrecision(2)}`)),
    name, mode: "markers+text", textposition: "top center", marker: { symbol, size: 9 },
    hovertemplate: "%{hovertext}<br>%{x:.4f} bpw, error %{y:.4g}<br>%{customdata}<extra></extra>", type: "scatter",
  });
  const traces = [
    { x: front.bits_per_weight, y: front.error, name: "bpwopt", mode: "lines+markers", marker: { size: 4 },
      hovertemplate: "%{x:.4f} bpw, error %{y:.4g}<extra></extra>", type: "scatter" },
    points(front.presets, "llama.cpp presets", "diamond", commonNames),
    points(front.plans, "stored plans", "square"), // named on hover: a state gathers many
    { x: [], y: [], name: "this plan", mode: "markers", marker: { size: 14, symbol: "star", color: "#d62728" },
      type: "scatter", hovertemplate: "this plan: %{x:.4f} bpw, error %{y:.4g}<extra></extra>" },
  ];
  const layout = { margin: { t: 30, r: 20, b: 80, l: 70 }, title: { text: `${front.model_name}: ${front.objective}` },
                   xaxis: { title: { text: "bits per weight" } }, yaxis: { title: { text: front.error_label }, type: "log" },
                   legend: { orientation: "h", y: -0.22 } };
  Plotly.newPlot("curve", traces, layout, { responsive: true, displaylogo: false });
}

function onSlide() {
  const bpw = front.bits_per_weight[Number($("bpw").value)];
  $("bpw-value").textContent = `${bpw.toFixed(4)} bpw`;
  $("bpw-value").dataset.bpw = String(bpw);
  clearTimeout(replanTimer);
  replanTimer = setTimeout(() => replan({ target_bpw: bpw }), 120);
}

async function replan(asked) {
  // One request at a time: a state answers one request at a time anyway, and a plan for a place the control
  // has already left is not worth waiting for. When an answer comes, the newest target is asked if it differs.
  target = asked;
  if (planning) return;
  planning = true;
  let sent = null;
  while (sent !== target) {
    sent = target;
    const started = performance.now();
    try {
      const body = { ...selection(), ...sent, compare_presets: false }; // the presets come from the curve
      const answer = await api("/api/plans", { method: "POST", body: JSON.stringify(body) });
      if (sent === target) {
        plan = answer;
        showPlan(performance.now() - started);
      }
    } catch (error) {
      if (sent === target) showError($("plan-file"), error);
    }
  }
  planning = false;
}

function showPlan(milliseconds) {
  $("plan-file").classList.remove("error");
  $("plan-file").textContent = `${plan.file_bytes.toLocaleString("en-US")} bytes (${(plan.file_bytes / 1e6).toFixed(1)} MB)`;
  $("plan-file").dataset.fileBytes = String(plan.file_bytes);
  $("plan-bpw").textContent = plan.bits_per_weight.toFixed(4);
  $("plan-error").textContent = plan.predicted_error.toPrecision(6);
  const counts = {};
  plan.tensors.forEach((t) => { counts[t.qtype] = (counts[t.qtype] || 0) + 1; });
  $("plan-types").textContent = Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([q, n]) => `${n} ${q}`).join(", ");
  $("plan").dataset.types = JSON.stringify(Object.fromEntries(plan.tensors.map((t) => [t.name, t.qtype])));
  $("plan").dataset.replanMs = String(Math.round(milliseconds));
  $("plan").dataset.target = JSON.stringify(target);
  $("presets").tBodies[0].replaceChildren(...nearestPresets(plan.bits_per_weight).map((p) => {
    const row = document.createElement("tr");
    const ours = curveErrorAt(p.bits_per_weight);
    [p.label, p.bits_per_weight.toFixed(4), p.error.toPrecision(4),
     ours == null ? "–" : `${ours.toPrecision(4)} (${(ours / p.error).toFixed(2)}×)`]
      .forEach((text) => row.insertCell().textContent = text);
    return row;
  }));
  Plotly.restyle("curve", { x: [[plan.bits_per_weight]], y: [[plan.predicted_error]] }, [3]);
  drawBits();
  $("write").disabled = false;
}

function nearestPresets(bpw, count = 3) {
  return [...front.presets].sort((a, b) => Math.abs(a.bits_per_weight - bpw) - Math.abs(b.bits_per_weight - bpw))
    .slice(0, count).sort((a, b) => a.bits_per_weight - b.bits_per_weight);
}

function curveErrorAt(bpw) {
  // the least error the traced curve reaches at or below bpw: bpwopt's plan at that preset's size
  let error = null;
  front.bits_per_weight.forEach((x, i) => { if (x <= bpw) error = front.error[i]; });
  return error;
}

function drawBits() {
  const cells = new Map(); // class -> layer -> tensor
  const layers = new Set();
  plan.tensors.filter((t) => t.varied).forEach((t) => {
    const match = t.name.match(/^blk\.(\d+)\./);
    const layer = match ? Number(match[1]) : -1;
    layers.add(layer);
    if (!cells.has(t.category)) cells.set(t.category, new Map());
    cells.get(t.category).set(layer, t);
  });
  const columns = [...layers].sort((a, b) => a - b);
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  head.insertCell().textContent = "class";
  columns.forEach((layer) => head.insertCell().textContent = layer < 0 ? "—" : String(layer));
  [...cells.keys()].sort().forEach((category) => {
    const row = table.insertRow();
    row.insertCell().textContent = category;
    columns.forEach((layer) => {
      const cell = row.insertCell();
      const t = cells.get(category).get(layer);
      if (!t) return;
      const bpw = (8 * t.data_bytes) / t.elements;
      cell.textContent = t.qtype;
      cell.title = `${t.name}: ${t.qtype}, ${bpw.toFixed(2)} bpw`;
      cell.style.background = `hsl(${Math.min(1, Math.max(0, (bpw - 2) / 7)) * 220}, 70%, 80%)`;
    });
  });
  $("bits").replaceChildren(table);
}

async function startJob(body) {
  try {
    follow(await api("/api/jobs", { method: "POST", body: JSON.stringify(body) }));
  } catch (error) {
    const item = document.createElement("li");
    showError(item, error);
    $("jobs").prepend(item);
  }
}

function unfinished(job) {
  return job.status === "queued" || job.status === "running";
}

function follow(job) {
  let item = document.querySelector(`#jobs li[data-job="${job.id}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.job = job.id;
    $("jobs").prepend(item);
  }
  render(item, job);
  if (unfinished(job)) {
    const events = new EventSource(`/api/jobs/${job.id}/events`);
    events.onmessage = (message) => {
      const view = JSON.parse(message.data);
      render(item, view);
      if (!unfinished(view)) {
        events.close();
        if (view.kind === "evaluate") loadFront(); // the stored plan it measured now has its KLD on the curve
        else loadLists();
      }
    };
  }
}

function button(text, className, onClick) {
  const element = document.createElement("button");
  element.textContent = text;
  element.className = className;
  element.addEventListener("click", onClick);
  return element;
}

function render(item, job) {
  item.dataset.status = job.status;
  const stage = job.status === "running" && job.stage ? ` ${job.stage} ${job.percent}%` : "";
  item.replaceChildren(`${job.kind} · ${job.status}${stage} `);
  item.title = job.command;
  if (job.status === "running") {
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = job.percent;
    item.append(bar);
  }
  const detail = document.createElement("span");
  if (job.error) {
    detail.className = "error";
    detail.textContent = ` ${job.error}`;
  } else if (job.kind === "evaluate" && job.result) {
    const r = job.result;
    detail.className = "kld";
    detail.textContent = ` KLD ${r.mean_kld.toPrecision(4)} ± ${r.mean_kld_stderr.toPrecision(2)} nats/token, ` +
      `perplexity ${r.ppl_quant.toFixed(3)} (base ${r.ppl_base.toFixed(3)}), same top token ` +
      `${(100 * r.same_top_rate).toFixed(1)}%, ${r.tokens} tokens`;
  } else if (job.written.length) {
    detail.className = "written";
    detail.textContent = ` wrote ${job.written.map((w) => `${w.path} (${w.bytes.toLocaleString("en-US")} bytes)`).join(", ")}`;
  }
  item.append(detail);
  if (unfinished(job)) {
    item.append(" ", button("cancel", "cancel", () => api(`/api/jobs/${job.id}/cancel`, { method: "POST" })
      .catch((error) => showError(detail, error))));
  }
  if (job.kind === "write" && job.status === "done") {
    job.written.forEach((w) => item.append(" ", button(`measure KLD of ${w.path.split("/").pop()}`, "evaluate", () =>
      startJob({ kind: "evaluate", model: job.request.model, quant: w.path, state: job.state, ...evaluateWindows() }))));
  }
}

function evaluateWindows() {
  const chunks = Number($("chunks").value);
  return chunks > 0 ? { chunks } : {};
}

function writeAsked() {
  return "target_bpw" in target ? { target_bpw: target.target_bpw } : { target_sizes: [target.target_size] };
}

$("bpw").addEventListener("input", onSlide);
$("size").addEventListener("change", () => { if ($("size").value.trim()) replan({ target_size: $("size").value.trim() }); });
$("state").addEventListener("change", loadFront);
$("model").addEventListener("change", loadFront);
$("write").addEventListener("click", () => startJob({ kind: "write", ...selection(), ...writeAsked() }));
$("ladder").addEventListener("click", () => {
  const sizes = $("ladder-sizes").value.split(",").map((s) => s.trim()).filter(Boolean);
  startJob({ kind: "write", ...selection(), target_sizes: sizes });
});
$("measure").addEventListener("click", () => {
  const { state, ...rest } = selection();
  startJob({ kind: "measure", ...rest, state: state || null, target_bpw: plan ? plan.bits_per_weight : 4.5 });
});
window.addEventListener("load", async () => {
  await loadLists();
  (await api("/api/jobs")).forEach(follow);
});
