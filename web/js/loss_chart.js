// Live training chart on the Train LoRA node: a DOM widget (works in the classic canvas and in Vue "Nodes 2.0" mode),
// fed by the server's websocket events ("lora_trainer.progress" every step, ".validation", ".saved", ".cancelled",
// ".diverged") and restored from the node's UI output ("lora_trainer_loss", "_skipped", "_lr", "_grad_norm",
// "_validation", "_saves"; older outputs lack some) when a workflow or a history entry is reopened. Server data is
// only ever drawn on a <canvas> or set as textContent: nothing from the server is inserted as HTML.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "LoraTrainer_TrainLoRA";
const HEIGHT = 220;
const COLOURS = {
  loss: "#5b7fb8", smoothed: "#9fd0ff", validation: "#ffa040", lr: "#6cd46c", gradNorm: "#c58cff",
  skipped: "#d04040", save: "#e0e0e0", text: "#999", grid: "#333",
};
const LEGEND = { loss: "loss", smoothed: "smoothed", validation: "val", lr: "lr", gradNorm: "grad norm", save: "save" };
const LEGEND_H = 12, TICKS_H = 12, GRAD_H = 30, PAD = 4;

// Fields may be absent (older outputs) or null (a skipped step): both become NaN and are left out of the drawing.
const num = (v) => (v === null || v === undefined ? NaN : Number(v));
const list = (v) => (Array.isArray(v) ? v : []);
const fmt = (v, digits = 4) => (Number.isFinite(v) ? v.toPrecision(digits) : "–");
const fmtRate = (v) => (Number.isFinite(v) ? v.toExponential(2) : "–");

function formatSeconds(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function band(values) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(hi))) { // constant: a band around it, nothing divides by zero
    const pad = Math.max(Math.abs(hi) * 0.05, 1e-6);
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

// Whole step numbers 1, 2 or 5 x 10^k apart, at most `most` of them, inside [first, last].
function niceTicks(first, last, most) {
  const span = Math.max(last - first, 1), unit = 10 ** Math.floor(Math.log10(span / Math.max(most, 1)));
  const spacing = Math.max(1, Math.round([1, 2, 5, 10].map((m) => m * unit).find((s) => span / s <= most)));
  const ticks = [];
  for (let t = Math.ceil(first / spacing) * spacing; t <= last; t += spacing) ticks.push(t);
  return ticks;
}

class LossChart {
  constructor() {
    this.root = document.createElement("div");
    this.root.className = "lora-trainer-chart";
    // min-height: in Vue mode the widget's wrapper has no height of its own.
    this.root.style.cssText =
      `display:flex;flex-direction:column;width:100%;height:100%;min-height:${HEIGHT}px;gap:2px;box-sizing:border-box;`;
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText =
      "flex:1;width:100%;min-height:140px;background:#1b1b1b;border:1px solid #444;border-radius:4px;";
    this.status = document.createElement("div");
    this.status.className = "lora-trainer-status";
    // pre-wrap: lines break only at the separators between items (each item is a nowrap span).
    this.status.style.cssText = "font:10px monospace;color:#bbb;line-height:12px;height:48px;overflow:hidden;" +
      "white-space:pre-wrap;";
    this.root.append(this.canvas, this.status);
    this.clear();
    this.setStatus(["loss: waiting for training"]);
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  clear() {
    this.points = []; // one per step: {step, loss (NaN when skipped), smoothed, lr, gradNorm}
    this.validation = []; // {step, loss}
    this.saves = []; // step numbers
    this.drawn = {}; // points drawn per series in the last draw (for tests and debugging)
  }

  // The status: items separated so that textContent reads as one line.
  setStatus(items, separator = "  ") {
    const spans = items.filter(Boolean).map((text, i) => {
      const span = document.createElement("span");
      span.style.whiteSpace = "nowrap";
      span.textContent = text;
      return i ? [document.createTextNode(separator), span] : [span];
    });
    this.status.replaceChildren(...spans.flat());
  }

  reset() {
    this.clear();
    this.setStatus(["loss: training…"]);
    this.draw();
  }

  // A step at or before the newest one means a new run without an "executing" reset: forget what came later.
  forgetFrom(step) {
    this.points = this.points.filter((p) => p.step < step);
    this.validation = this.validation.filter((v) => v.step < step);
    this.saves = this.saves.filter((s) => s < step);
  }

  push(report) {
    const step = num(report.step);
    if (step === 1 || (this.points.length && step <= this.points.at(-1).step)) this.forgetFrom(step);
    // A skipped step (its loss or gradients were NaN/inf) has no loss: it is drawn as a red mark.
    const loss = report.skipped ? NaN : num(report.loss);
    const lr = num(report.learning_rate), gradNorm = report.skipped ? NaN : num(report.grad_norm);
    this.points.push({ step, loss, smoothed: num(report.smoothed_loss), lr, gradNorm });
    const skipped = this.points.filter((p) => !Number.isFinite(p.loss)).length;
    const val = this.validation.at(-1);
    this.setStatus([
      `step ${step}/${report.steps}`,
      report.skipped ? "SKIPPED (loss not finite)" : `loss ${fmt(loss)}`,
      `smoothed ${fmt(num(report.smoothed_loss))}`,
      val && `val ${fmt(val.loss)} @${val.step}`,
      skipped && `${skipped} skipped`,
      `lr ${fmtRate(lr)}`,
      Number.isFinite(gradNorm) && `grad ${fmt(gradNorm, 3)}`,
      this.saves.length && `saved @${this.saves.at(-1)}`,
      `elapsed ${formatSeconds(num(report.elapsed_s))}`,
      num(report.sampling_s) > 0 && `sampling ${formatSeconds(num(report.sampling_s))}`,
      `eta ${formatSeconds(num(report.eta_s))}`,
    ]);
    this.draw();
  }

  validated(report) {
    const step = num(report.step);
    this.validation = this.validation.filter((v) => v.step < step);
    this.validation.push({ step, loss: num(report.loss) });
    this.draw();
  }

  saved(report) {
    const step = num(report.step);
    this.saves = this.saves.filter((s) => s < step).concat(step);
    this.draw();
  }

  // The node's UI output after a run (live, or when a workflow or history entry is reopened).
  restore(output) {
    const losses = list(output.lora_trainer_loss).map(num), marks = new Set(list(output.lora_trainer_skipped).map(num));
    const lrs = list(output.lora_trainer_lr).map(num), norms = list(output.lora_trainer_grad_norm).map(num);
    const total = losses.length + marks.size;
    let smoothed = NaN, next = 0;
    this.clear();
    for (let step = 1; step <= total; step++) {
      // Losses are of the applied steps only: the k-th is at the k-th step number that was not skipped.
      if (marks.has(step) || next >= losses.length) {
        this.points.push({ step, loss: NaN, smoothed, lr: NaN, gradNorm: NaN });
        continue;
      }
      const k = next++, loss = losses[k];
      if (Number.isFinite(loss)) smoothed = Number.isFinite(smoothed) ? 0.9 * smoothed + 0.1 * loss : loss;
      this.points.push({ step, loss, smoothed, lr: lrs[k] ?? NaN, gradNorm: norms[k] ?? NaN });
    }
    this.validation = list(output.lora_trainer_validation).filter(Array.isArray)
      .map(([step, loss]) => ({ step: num(step), loss: num(loss) }));
    this.saves = list(output.lora_trainer_saves).map(num);
    const last = this.points.filter((p) => Number.isFinite(p.loss)).at(-1), val = this.validation.at(-1);
    this.setStatus(last ? [
      `done: ${losses.length} steps`,
      `last loss ${fmt(last.loss)}`,
      val && `val ${fmt(val.loss)} (step ${val.step})`,
      Number.isFinite(last.lr) && `lr ${fmtRate(last.lr)}`,
      marks.size && `${marks.size} skipped`,
      this.saves.length && `${this.saves.length} saved`,
    ] : ["no loss values"], ", ");
    this.draw();
  }

  cancelled(step, file) {
    this.setStatus([`cancelled at step ${step}` + (file ? ` (kept as loras/cancelled/${file})` : "")]);
  }

  diverged(step, file) {
    this.setStatus([
      `stopped at step ${step}: the loss diverged` + (file ? ` (last finite LoRA kept as loras/diverged/${file})` : "")]);
  }

  // Every series as [step, value] pairs of finite numbers, and the marked steps.
  series() {
    const pairs = (items, key) => items.map((p) => [p.step, p[key]]).filter(([s, v]) => Number.isFinite(s + v));
    return {
      loss: pairs(this.points, "loss"),
      smoothed: pairs(this.points.filter((p) => Number.isFinite(p.loss)), "smoothed"),
      validation: pairs(this.validation, "loss"),
      lr: pairs(this.points, "lr"),
      gradNorm: pairs(this.points, "gradNorm"),
      skipped: this.points.filter((p) => !Number.isFinite(p.loss)).map((p) => p.step),
      save: this.saves.filter(Number.isFinite),
    };
  }

  draw() {
    const c = this.canvas;
    const w = Math.max(1, c.clientWidth), h = Math.max(1, c.clientHeight);
    const scale = window.devicePixelRatio || 1;
    if (c.width !== Math.round(w * scale) || c.height !== Math.round(h * scale)) {
      c.width = Math.round(w * scale);
      c.height = Math.round(h * scale);
    }
    const ctx = c.getContext("2d");
    ctx.setTransform(scale, 0, 0, scale, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const s = this.series();
    this.drawn = Object.fromEntries(Object.keys(s).map((k) => [k, 0]));
    const steps = [...s.loss, ...s.validation, ...s.lr].map(([step]) => step).concat(s.skipped, s.save);
    if (!steps.length) return;
    const first = Math.min(...steps), last = Math.max(...steps);
    const x = (step) => PAD + (w - 2 * PAD) * (last > first ? (step - first) / (last - first) : 0.5);
    // The loss panel on top; grad norm, when there is one, in a thin panel of its own under it.
    const bottom = h - TICKS_H - (s.gradNorm.length ? GRAD_H : 0);
    const main = { top: LEGEND_H + 2, bottom: bottom - PAD };
    const grad = { top: bottom + 2, bottom: h - TICKS_H - 2 };
    const y = (v, [lo, hi], panel) =>
      panel.bottom - (panel.bottom - panel.top) * (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo);

    const vertical = (step, colour, dash) => {
      ctx.strokeStyle = colour;
      ctx.lineWidth = 1;
      ctx.setLineDash(dash);
      ctx.beginPath();
      ctx.moveTo(Math.round(x(step)) + 0.5, main.top);
      ctx.lineTo(Math.round(x(step)) + 0.5, h - TICKS_H);
      ctx.stroke();
      ctx.setLineDash([]);
    };
    const line = (key, range, panel, { width = 2, alpha = 1, dots = false } = {}) => {
      const pts = s[key].map(([step, v]) => [x(step), y(v, range, panel)]);
      ctx.strokeStyle = ctx.fillStyle = COLOURS[key];
      ctx.globalAlpha = alpha;
      ctx.lineWidth = width;
      ctx.beginPath();
      pts.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.stroke();
      for (const [px, py] of dots || pts.length === 1 ? pts : []) {
        ctx.beginPath();
        ctx.arc(px, py, 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
      ctx.globalAlpha = 1;
      this.drawn[key] = pts.length;
    };
    const label = (text, colour, lx, ly, align = "left") => {
      ctx.fillStyle = colour;
      ctx.textAlign = align;
      ctx.fillText(text, lx, ly);
      ctx.textAlign = "left";
    };
    ctx.font = "9px monospace";

    for (const step of s.skipped) vertical(step, COLOURS.skipped, []);
    for (const step of s.save) {
      vertical(step, COLOURS.save, [3, 3]);
      ctx.fillStyle = COLOURS.save;
      ctx.beginPath(); // a small flag at the top, so a save reads apart from a skipped step
      ctx.moveTo(x(step) - 3, main.top);
      ctx.lineTo(x(step) + 3, main.top);
      ctx.lineTo(x(step), main.top + 4);
      ctx.fill();
    }
    this.drawn.skipped = s.skipped.length;
    this.drawn.save = s.save.length;
    if (s.lr.length) { // right axis, its own scale: the rate is orders of magnitude below the loss
      const range = band(s.lr.map(([, v]) => v));
      line("lr", range, main, { width: 1.5 });
      label(fmtRate(range[1]), COLOURS.lr, w - PAD, main.top + 8, "right");
      label(fmtRate(range[0]), COLOURS.lr, w - PAD, main.bottom - 2, "right");
    }
    const onLeft = [...s.loss, ...s.validation].map(([, v]) => v);
    if (onLeft.length) {
      const range = band(onLeft);
      line("loss", range, main, { width: 1, alpha: 0.6 });
      line("smoothed", range, main);
      line("validation", range, main, { width: 1.5, dots: true });
      label(range[1].toPrecision(4), COLOURS.text, PAD, main.top + 8);
      label(range[0].toPrecision(4), COLOURS.text, PAD, main.bottom - 2);
    }
    if (s.gradNorm.length) {
      const range = band(s.gradNorm.map(([, v]) => v));
      ctx.strokeStyle = COLOURS.grid;
      ctx.lineWidth = 1;
      ctx.strokeRect(0.5, grad.top - 1.5, w - 1, grad.bottom - grad.top + 3);
      line("gradNorm", range, grad, { width: 1 });
      label(`grad norm ≤ ${fmt(range[1], 3)}`, COLOURS.gradNorm, PAD, grad.top + 8);
    }
    for (const tick of niceTicks(first, last, Math.max(2, Math.floor(w / 40)))) {
      const tx = Math.round(x(tick)) + 0.5;
      ctx.strokeStyle = COLOURS.text;
      ctx.beginPath();
      ctx.moveTo(tx, h - TICKS_H);
      ctx.lineTo(tx, h - TICKS_H + 3);
      ctx.stroke();
      label(String(tick), COLOURS.text, Math.min(Math.max(tx, PAD + 8), w - PAD - 8), h - 2, "center");
    }
    let lx = PAD; // legend: only what is drawn
    for (const key of ["loss", "smoothed", "validation", "lr", "gradNorm", "save"].filter((k) => this.drawn[k])) {
      label(LEGEND[key], COLOURS[key], lx, LEGEND_H - 2);
      lx += ctx.measureText(LEGEND[key]).width + 8;
    }
  }
}

// Websocket events name a node by its execution id, a path of node ids through subgraphs ("12", "5:12"); the
// frontend's output store keys a node by its locator id ("12", "<subgraph uuid>:12").
function nodeFor(id) {
  if (id === undefined || id === null) return null;
  const parts = String(id).split(":");
  let graph = app.graph;
  if (parts.length === 2 && graph?.subgraphs?.has?.(parts[0])) graph = graph.subgraphs.get(parts[0]);
  else for (const part of parts.slice(0, -1)) graph = graph?.getNodeById?.(Number(part))?.subgraph;
  const last = parts.at(-1);
  return graph?.getNodeById?.(Number(last)) ?? graph?.getNodeById?.(last) ?? null;
}

const chartOf = (id) => {
  const node = nodeFor(id);
  return node?.type === NODE_TYPE ? node.loraTrainerChart : undefined;
};

function restoreFrom(node, output) {
  if (Array.isArray(output?.lora_trainer_loss)) node.loraTrainerChart?.restore(output);
}

app.registerExtension({
  name: "lora_trainer.loss_chart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // A training seed should stay put (same seed, same LoRA); a saved workflow still restores its own choice.
      const seed = this.widgets?.find((w) => w.name === "seed");
      for (const control of seed?.linkedWidgets ?? []) control.value = "fixed";
      this.loraTrainerChart = new LossChart();
      this.addDOMWidget("loss_chart", "lora_trainer_loss_chart", this.loraTrainerChart.root, {
        serialize: false,
        getMinHeight: () => HEIGHT,
        getHeight: () => HEIGHT,
      });
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      restoreFrom(this, output);
    };
  },
  // Reopening a history entry or switching workflow tabs hands the stored outputs here (the frontend does not call
  // onExecuted for them).
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [id, output] of Object.entries(nodeOutputs ?? {})) {
      const node = nodeFor(id);
      if (node?.type === NODE_TYPE) restoreFrom(node, output);
    }
  },
  setup() {
    // A new run of the node starts a new curve.
    api.addEventListener("executing", ({ detail }) => {
      chartOf(detail && typeof detail === "object" ? detail.node : detail)?.reset();
    });
    api.addEventListener("lora_trainer.progress", ({ detail }) => chartOf(detail?.node)?.push(detail));
    api.addEventListener("lora_trainer.validation", ({ detail }) => chartOf(detail?.node)?.validated(detail));
    api.addEventListener("lora_trainer.saved", ({ detail }) => chartOf(detail?.node)?.saved(detail));
    api.addEventListener("lora_trainer.cancelled", ({ detail }) => chartOf(detail?.node)?.cancelled(detail.step, detail.file));
    api.addEventListener("lora_trainer.diverged", ({ detail }) => chartOf(detail?.node)?.diverged(detail.step, detail.file));
  },
});
