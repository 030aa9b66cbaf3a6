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
    this.points.push({ step: report.step, loss: Number(report.loss), smoothed: Number(report.smoothed_loss) });
    this.status.textContent =
      `step ${report.step}/${report.steps}  loss ${Number(report.loss).toFixed(5)}  ` +
      `smoothed ${Number(report.smoothed_loss).toFixed(5)}  lr ${Number(report.learning_rate).toExponential(1)}  ` +
      `elapsed ${formatSeconds(report.elapsed_s)}  eta ${formatSeconds(report.eta_s)}`;
    this.draw();
  }

  setAll(losses) {
    let smoothed = null;
    this.points = losses.map((v, i) => {
      smoothed = smoothed === null ? v : 0.9 * smoothed + 0.1 * v;
      return { step: i + 1, loss: Number(v), smoothed };
    });
    const last = this.points.at(-1);
    this.status.textContent = last ? `done: ${last.step} steps, last loss ${last.loss.toFixed(5)}` : "no loss values";
    this.draw();
  }

  cancelled(step) {
    this.status.textContent = `cancelled at step ${step} (kept in loras/cancelled)`;
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
    const pts = this.points.filter((p) => Number.isFinite(p.loss));
    if (!pts.length) return;
    let lo = Math.min(...pts.map((p) => p.loss)), hi = Math.max(...pts.map((p) => p.loss));
    if (hi - lo < 1e-12) { const pad = Math.max(Math.abs(hi) * 0.05, 1e-6); lo -= pad; hi += pad; }
    const pad = 6, n = pts.length;
    const x = (i) => pad + (w - 2 * pad) * (n > 1 ? i / (n - 1) : 0.5);
    const y = (v) => h - pad - (h - 2 * pad) * (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo);
    for (const [key, colour, width] of [["loss", "#5b7fb8", 1], ["smoothed", "#9fd0ff", 2]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p[key])) : ctx.moveTo(x(i), y(p[key]))));
      if (n === 1) ctx.arc(x(0), y(pts[0][key]), 2, 0, 2 * Math.PI);
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
      if (Array.isArray(output?.lora_trainer_loss)) this.loraTrainerChart?.setAll(output.lora_trainer_loss);
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
      nodeFor(detail?.node)?.loraTrainerChart?.cancelled(detail.step));
  },
});
