"""The real frontend in Chromium: find and drag the node, check defaults, run a graph, watch the live chart, Russian.

Screenshots go to test-artifacts/browser/ (kept by CI as artifacts)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow("drives the real frontend in Chromium (~25 s a test); the fast tier keeps finding, running and charting a node")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = "LoraTrainer_TrainLoRA"
DEFAULTS = {"batch_size": 1, "grad_accumulation_steps": 1, "steps": 16, "learning_rate": 0.0005, "rank": 8,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16",
            "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]"}

# The Train LoRA node already in the graph, fed by a tiny model and data; with ``options``, a Training Options node
# with those widget values, and held-out data (other seed) as its validation data.
BUILD_GRAPH = """
([settings, options]) => {
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (node, name, value) => { const w = node.widgets.find((w) => w.name === name); w.value = value; };
  const train = app.graph._nodes.find((n) => n.type === "LoraTrainer_TrainLoRA")
    ?? add("LoraTrainer_TrainLoRA", [450, 80]);
  const model = add("UNETLoader", [50, 100]);
  set(model, "unet_name", "tiny_sd3.safetensors");
  const data = add("LoraTrainerTest_TinyTrainingData", [50, 300]);
  set(data, "height", 8);
  set(data, "width", 8);
  const save = add("LoraTrainer_SaveLoRA", [1100, 100]);
  const graph = add("LoraTrainer_LossGraph", [1100, 350]);
  model.connect(0, train, 0);
  data.connect(0, train, 1);
  data.connect(1, train, 2);
  train.connect(1, save, 0);
  train.connect(3, save, 2);
  train.connect(2, graph, 0);
  for (const [k, v] of Object.entries(settings)) set(train, k, v);
  if (options) {
    const held = add("LoraTrainerTest_TinyTrainingData", [50, 620]);
    for (const [k, v] of Object.entries({ height: 8, width: 8, count: 2, seed: 99 })) set(held, k, v);
    const opts = add("LoraTrainer_TrainingOptions", [1100, 600]);
    held.connect(0, opts, opts.inputs.findIndex((i) => i.name === "validation_latents"));
    held.connect(1, opts, opts.inputs.findIndex((i) => i.name === "validation_positive"));
    opts.connect(0, train, train.inputs.findIndex((i) => i.name === "options"));
    for (const [k, v] of Object.entries(options)) set(opts, k, v);
  }
  app.graph.setDirtyCanvas(true, true);
  return train.id;
}
"""

# A run long enough for a cosine schedule after warmup, validation and intermediate saves to show on the chart.
CHART_OPTIONS = {"lr_schedule": "cosine", "warmup_steps": 15, "validate_every_n_steps": 15, "save_every_n_steps": 50,
                 "save_prefix": "browser/chart"}

# The chart's colours of the validation loss and the learning rate (web/js/loss_chart.js COLOURS).
CHART_COLOURS = {"validation": "#ffa040", "lr": "#6cd46c"}

COLOUR_ROWS = """
([id, colours]) => {
  // Per colour: how many canvas pixels have it (within a tolerance: lines are anti-aliased) and the rows they span,
  // as fractions of the canvas height. The legend row at the top and the axis labels at the right are left out:
  // only the lines count.
  const canvas = app.graph.getNodeById(id).loraTrainerChart.canvas, dpr = window.devicePixelRatio || 1;
  const { data, width, height } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const out = {};
  for (const [name, hex] of Object.entries(colours)) {
    const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    let count = 0, top = height, bottom = -1;
    for (let row = Math.ceil(14 * dpr); row < height; row++) {
      for (let col = 0; col < width - 50 * dpr; col++) {
        const i = 4 * (row * width + col);
        if (!rgb.every((c, k) => Math.abs(data[i + k] - c) <= 24)) continue;
        count++;
        top = Math.min(top, row);
        bottom = Math.max(bottom, row);
      }
    }
    out[name] = { count, top: top / height, bottom: bottom / height };
  }
  return out;
}
"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (tools/bootstrap.sh installs Debian's chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        yield b
        b.close()


def open_app(browser, server, locale: str):
    server.post("/queue", {"clear": True})
    server.interrupt()  # nothing left running from an earlier test
    server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Locale": locale})
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(server.url)
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=90000)
    page.wait_for_timeout(1500)
    page.evaluate("() => app.graph.clear()")
    return page


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def drag_from_library(page, search: str, label: str) -> None:
    page.keyboard.press("n")  # Node Library
    box = page.locator(".search-box-input").first  # its placeholder is translated
    box.fill(search)
    item = page.get_by_text(label, exact=True).first
    item.wait_for(timeout=20000)
    item.drag_to(page.locator("#graph-canvas"), target_position={"x": 650, "y": 120})
    page.keyboard.press("n")  # close the library again


def chart_points(page, node_id) -> int:
    return page.evaluate("(id) => app.graph.getNodeById(id).loraTrainerChart.points.length", node_id)


def chart(page, node_id, what: str):
    """A property of the node's chart: "drawn" (points drawn per series), "series()" (every series' points)."""
    return page.evaluate(f"(id) => app.graph.getNodeById(id).loraTrainerChart.{what}", node_id)


def shot_chart(page, node_id, name: str) -> None:
    """The chart alone, at the page's pixel density."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    box = page.evaluate("(id) => { const r = app.graph.getNodeById(id).loraTrainerChart.root.getBoundingClientRect(); "
                        "return {x: r.x, y: r.y, width: r.width, height: r.height}; }", node_id)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), clip=box)


def assert_full_chart(page, node_id, steps: int, validations: int, saves: int) -> None:
    """Every series of a run with validation, a learning-rate schedule and saves is drawn, in its colour, the rate on
    an axis of its own."""
    drawn = chart(page, node_id, "drawn")
    assert drawn == {"loss": steps, "smoothed": steps, "validation": validations, "lr": steps, "gradNorm": steps,
                     "skipped": 0, "save": saves}, drawn
    rates = [v for _, v in chart(page, node_id, "series()")["lr"]]
    assert max(rates) > 3 * min(rates), "warmup and cosine decay change the learning rate"
    pixels = page.evaluate(COLOUR_ROWS, [node_id, CHART_COLOURS])
    assert all(p["count"] > 20 for p in pixels.values()), pixels
    # The rate (about 1e-3) spans most of the loss panel, from its top to its bottom: it has its own scale. On the
    # loss's scale (about 1) it would be a flat line at the bottom.
    assert pixels["lr"]["bottom"] - pixels["lr"]["top"] > 0.4, pixels


def wait_for_status(page, node_id, prefix: str, timeout_ms: int = 180000) -> None:
    page.wait_for_function(
        "([id, prefix]) => app.graph.getNodeById(id).loraTrainerChart.status.textContent.startsWith(prefix)",
        arg=[node_id, prefix], timeout=timeout_ms)


def queue_and_watch(page, node_id, name: str, min_points: int) -> None:
    """Queues the graph from the UI, screenshots the chart mid-run and after the run."""
    start_and_wait_for_points(page, node_id, min_points)
    shot(page, f"{name}_mid_run")
    wait_for_status(page, node_id, "done")
    shot(page, f"{name}_after_run")


def start_and_wait_for_points(page, node_id, min_points: int) -> None:
    """Queues the graph from the UI and waits until this run's curve has ``min_points`` points."""
    page.evaluate("(id) => app.graph.getNodeById(id).loraTrainerChart.reset()", node_id)
    page.evaluate("() => app.queuePrompt(0, 1)")
    page.wait_for_function(
        "([id, n]) => { const c = app.graph.getNodeById(id).loraTrainerChart; "
        "return c.points.length >= n && c.status.textContent.startsWith('step '); }",
        arg=[node_id, min_points], timeout=120000)


@pytest.mark.fast
def test_node_in_the_real_frontend(server, browser):
    page = open_app(browser, server, "en")
    drag_from_library(page, "Train LoRA", "Train LoRA (LoRA Trainer)")
    widgets = page.evaluate(
        "() => Object.fromEntries(app.graph._nodes.find((n) => n.type === 'LoraTrainer_TrainLoRA')"
        ".widgets.map((w) => [w.name, w.value]))")
    for name, value in DEFAULTS.items():
        assert widgets[name] == value, (name, widgets[name])
    assert "loss_chart" in widgets
    assert widgets["control_after_generate"] == "fixed"  # the same seed trains the same LoRA again

    node_id = page.evaluate(BUILD_GRAPH, [{"steps": 150, "training_dtype": "fp32", "lora_dtype": "fp32",
                                          "gradient_checkpointing": False, "learning_rate": 0.002}, CHART_OPTIONS])
    queue_and_watch(page, node_id, "en", min_points=5)
    assert chart_points(page, node_id) == 150
    shot_chart(page, node_id, "en_chart")
    # Validation at steps 15, 30, ..., 150; saves at 50 and 100 (none after the last step).
    assert_full_chart(page, node_id, steps=150, validations=10, saves=2)

    # The frontend's Cancel button stops a long run; the node says at which step.
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.widgets.find((w) => w.name === 'steps').value = "
                  "100000; n.widgets.find((w) => w.name === 'seed').value = 77; }", node_id)
    start_and_wait_for_points(page, node_id, 3)
    page.get_by_label("Cancel current run").first.click()
    wait_for_status(page, node_id, "cancelled at step", 60000)
    shot(page, "en_cancelled")
    page.close()


def test_russian_locale(server, browser):
    page = open_app(browser, server, "ru")
    try:
        drag_from_library(page, "LoRA", "Обучить LoRA (LoRA Trainer)")
        title = page.evaluate("() => app.graph._nodes.find((n) => n.type === 'LoraTrainer_TrainLoRA').title")
        assert title == "Обучить LoRA (LoRA Trainer)"
        node_id = page.evaluate(BUILD_GRAPH, [{"steps": 60, "training_dtype": "fp32", "lora_dtype": "fp32",
                                              "gradient_checkpointing": False, "seed": 4}, None])
        queue_and_watch(page, node_id, "ru", min_points=3)
    finally:
        server.post("/settings", {"Comfy.Locale": "en"})
        page.close()


def test_chart_in_vue_nodes_mode_and_reopened_from_history(server, browser):
    """The newer frontend's Vue "Nodes 2.0" mode shows the chart too; a history entry loaded from the queue sidebar
    shows the chart of its run again, from the node's stored UI output."""
    server.post("/settings", {"Comfy.VueNodes.Enabled": True})
    try:
        page = open_app(browser, server, "en")
        node_id = page.evaluate(BUILD_GRAPH, [{"steps": 60, "training_dtype": "fp32", "lora_dtype": "fp32",
                                               "gradient_checkpointing": False, "learning_rate": 0.002, "seed": 5},
                                              {**CHART_OPTIONS, "warmup_steps": 6, "validate_every_n_steps": 10,
                                               "save_every_n_steps": 25}])
        in_vue_node = ("(id) => !!app.graph.getNodeById(id).loraTrainerChart.root"
                       ".closest(`[data-node-id='${id}']`)")
        page.wait_for_function(in_vue_node, arg=node_id, timeout=20000)
        queue_and_watch(page, node_id, "vue", min_points=5)
        shot_chart(page, node_id, "vue_chart")
        assert_full_chart(page, node_id, steps=60, validations=6, saves=2)
        live = chart(page, node_id, "series()")

        page.evaluate("() => app.graph.clear()")
        page.get_by_label("Queue (q)").first.click()
        page.locator(".task-item").first.click(button="right")  # the newest entry: this run
        page.get_by_text("Load Workflow", exact=True).first.click()
        page.get_by_label("Queue (q)").first.click()  # close the sidebar again
        wait_for_status(page, node_id, "done", 20000)
        page.wait_for_function(in_vue_node, arg=node_id, timeout=20000)
        shot(page, "vue_from_history")
        assert chart(page, node_id, "series()") == live
        assert_full_chart(page, node_id, steps=60, validations=6, saves=2)
        page.close()
    finally:
        server.post("/settings", {"Comfy.VueNodes.Enabled": False})
