// Live loss chart on the Train LoRA node: a DOM widget (works in the classic canvas and in Vue "Nodes 2.0" mode),
// fed by the server's "lora_trainer.progress" websocket event every optimizer step, and restored from the node's
// UI output ("lora_trainer_loss") when a workflow or a history entry is reopened. Server data is only ever drawn
// on a <canvas> or set as textContent: nothing from the server is inserted as HTML.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODE_TYPE = "LoraTrainer_TrainLoRA";
const HEIGHT = 150;

function formatSeconds(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

class LossChart {
  constructor() {
    this.root = document.createElement("div");
    this.root.className = "lora-trainer-chart";
    this.root.style.cssText = "display:flex;flex-direction:column;width:100%;height:100%;gap:2px;";
    this.canvas = document.createElement("canvas");
    this.canvas.style.cssText = "flex:1;width:100%;min-height:90px;background:#1b1b1b;border:1px solid #444;border-radius:4px;";
    this.status = document.createElement("div");
    this.status.className = "lora-trainer-status";
    this.status.style.cssText = "font:11px monospace;color:#bbb;white-space:nowrap;overflow:hidden;";
    this.root.append(this.canvas, this.status);
    this.points = [];
    this.status.textContent = "loss: waiting for training";
    new ResizeObserver(() => this.draw()).observe(this.canvas);
  }

  reset() {
    this.points = [];
    this.status.textContent = "loss: training…";
    this.draw();
  }

  push(report) {
    if (report.step === 1 || (this.points.length && report.step <= this.points.at(-1).step)) this.points = [];
    // A skipped step (its loss or gradients were NaN/inf) has no loss: it is drawn as a red mark.
    const loss = report.skipped ? NaN : Number(report.loss);
    this.points.push({ step: report.step, loss, smoothed: Number(report.smoothed_loss ?? NaN) });
    const skipped = this.points.filter((p) => !Number.isFinite(p.loss)).length;
    this.status.textContent =
      `step ${report.step}/${report.steps}  ` +
      (report.skipped ? "SKIPPED (loss not finite)  " : `loss ${loss.toFixed(5)}  `) +
      (skipped ? `${skipped} skipped  ` : "") +
      `smoothed ${Number(report.smoothed_loss).toFixed(5)}  lr ${Number(report.learning_rate).toExponential(1)}  ` +
      `elapsed ${formatSeconds(report.elapsed_s)}  eta ${formatSeconds(report.eta_s)}`;
    this.draw();
  }

  setAll(losses, skipped = []) {
    // losses: one per applied step; skipped: the step numbers that were skipped (in between, or at the end).
    const marks = new Set(skipped), total = losses.length + marks.size;
    let smoothed = null, next = 0;
    this.points = [];
    for (let step = 1; step <= total; step++) {
      if (marks.has(step) || next >= losses.length) {
        this.points.push({ step, loss: NaN, smoothed: NaN });
        continue;
      }
      const v = Number(losses[next++]);
      smoothed = smoothed === null ? v : 0.9 * smoothed + 0.1 * v;
      this.points.push({ step, loss: v, smoothed });
    }
    const last = this.points.filter((p) => Number.isFinite(p.loss)).at(-1);
    this.status.textContent = last
      ? `done: ${losses.length} steps, last loss ${last.loss.toFixed(5)}` + (marks.size ? `, ${marks.size} skipped` : "")
      : "no loss values";
    this.draw();
  }

  cancelled(step, file) {
    this.status.textContent = `cancelled at step ${step}` + (file ? ` (kept as loras/cancelled/${file})` : "");
  }

  diverged(step, file) {
    this.status.textContent =
      `stopped at step ${step}: the loss diverged` + (file ? ` (last finite LoRA kept as loras/diverged/${file})` : "");
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
    if (!this.points.length) return;
    const pts = this.points.filter((p) => Number.isFinite(p.loss));
    const first = this.points[0].step, last = this.points.at(-1).step, pad = 6;
    const x = (step) => pad + (w - 2 * pad) * (last > first ? (step - first) / (last - first) : 0.5);
    ctx.strokeStyle = "#d04040";
    ctx.lineWidth = 1;
    for (const p of this.points) {
      if (Number.isFinite(p.loss)) continue;
      ctx.beginPath();
      ctx.moveTo(x(p.step), pad);
      ctx.lineTo(x(p.step), h - pad);
      ctx.stroke();
    }
    if (!pts.length) return;
    let lo = Math.min(...pts.map((p) => p.loss)), hi = Math.max(...pts.map((p) => p.loss));
    if (hi - lo < 1e-12) { const pad = Math.max(Math.abs(hi) * 0.05, 1e-6); lo -= pad; hi += pad; }
    const y = (v) => h - pad - (h - 2 * pad) * (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo);
    for (const [key, colour, width] of [["loss", "#5b7fb8", 1], ["smoothed", "#9fd0ff", 2]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p[key])) : ctx.moveTo(x(p.step), y(p[key]))));
      if (pts.length === 1) ctx.arc(x(pts[0].step), y(pts[0][key]), 2, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.fillStyle = "#999";
    ctx.font = "10px monospace";
    ctx.fillText(hi.toPrecision(4), pad, 12);
    ctx.fillText(lo.toPrecision(4), pad, h - pad - 2);
  }
}

function nodeFor(id) {
  if (id === undefined || id === null) return null;
  const plain = String(id).split(":").at(-1); // subgraph ids look like "parent:child"
  return app.graph?.getNodeById?.(Number(plain)) ?? app.graph?.getNodeById?.(plain) ?? null;
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
      if (Array.isArray(output?.lora_trainer_loss)) {
        this.loraTrainerChart?.setAll(output.lora_trainer_loss, output.lora_trainer_skipped ?? []);
      }
    };
  },
  setup() {
    // A new run of the node starts a new curve.
    api.addEventListener("executing", ({ detail }) => {
      const id = detail && typeof detail === "object" ? detail.node : detail;
      const node = nodeFor(id);
      if (node?.type === NODE_TYPE) node.loraTrainerChart?.reset();
    });
    api.addEventListener("lora_trainer.progress", ({ detail }) => nodeFor(detail?.node)?.loraTrainerChart?.push(detail));
    api.addEventListener("lora_trainer.cancelled", ({ detail }) =>
      nodeFor(detail?.node)?.loraTrainerChart?.cancelled(detail.step, detail.file));
    api.addEventListener("lora_trainer.diverged", ({ detail }) =>
      nodeFor(detail?.node)?.loraTrainerChart?.diverged(detail.step, detail.file));
  },
});
