"""The real frontend in Chromium: find and drag the node, check defaults, run a graph, watch the live chart, Russian.

Screenshots go to test-artifacts/browser/ (kept by CI as artifacts)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = "LoraTrainer_TrainLoRA"
DEFAULTS = {"batch_size": 1, "grad_accumulation_steps": 1, "steps": 16, "learning_rate": 0.0005, "rank": 8,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "bf16", "lora_dtype": "bf16",
            "algorithm": "LoRA", "gradient_checkpointing": True, "existing_lora": "[None]"}

BUILD_GRAPH = """
(settings) => {
  const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; app.graph.add(n); return n; };
  const set = (node, name, value) => { const w = node.widgets.find((w) => w.name === name); w.value = value; };
  const train = app.graph._nodes.find((n) => n.type === "LoraTrainer_TrainLoRA");
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
  app.graph.setDirtyCanvas(true, true);
  return train.id;
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

    node_id = page.evaluate(BUILD_GRAPH, {"steps": 150, "training_dtype": "fp32", "lora_dtype": "fp32",
                                         "gradient_checkpointing": False, "learning_rate": 0.002})
    queue_and_watch(page, node_id, "en", min_points=5)
    assert chart_points(page, node_id) == 150

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
        node_id = page.evaluate(BUILD_GRAPH, {"steps": 60, "training_dtype": "fp32", "lora_dtype": "fp32",
                                             "gradient_checkpointing": False, "seed": 4})
        queue_and_watch(page, node_id, "ru", min_points=3)
    finally:
        server.post("/settings", {"Comfy.Locale": "en"})
        page.close()
