"""Regenerates example_workflows/ (UI format, for ComfyUI's template list) and example_workflows/api/ (API format,
used by the tests) from tools/workflows.py, converting through the real frontend (``app.loadApiJson``).

``python tools/make_templates.py [NAME ...]``: only the templates named (default: all). A template whose nodes the
running ComfyUI lacks (the audio template's TextEncodeAceStepAudio1.5 before 0.33) is made with a ComfyUI that has
them: ``COMFYUI_DIR=<ComfyUI 0.33> python tools/make_templates.py lora_trainer_audio_ace_step15``."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import workflows  # noqa: E402

OUT = harness.REPO / "example_workflows"


def main(names: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    unknown = set(names) - set(workflows.TEMPLATES)
    if unknown:
        raise SystemExit(f"no such template: {sorted(unknown)} (templates: {sorted(workflows.TEMPLATES)})")
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, harness.ComfyServer(Path(tmp)) as server, sync_playwright() as p:
        server.post("/settings", {"Comfy.TutorialCompleted": True})
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph", timeout=90000)
        for name, build in workflows.TEMPLATES.items():
            if names and name not in names:
                continue
            api = build()
            missing = sorted({n["class_type"] for n in api.values()} - set(server.object_info()))
            if missing:
                raise SystemExit(f"{name}: this ComfyUI has no {missing}: run with a COMFYUI_DIR that has them")
            (OUT / "api" / f"{name}.json").write_text(json.dumps(api, indent=2) + "\n")
            ui = page.evaluate("async ([api, name]) => { await app.loadApiJson(api, name); app.graph.arrange?.(); "
                               "return app.graph.serialize(); }", [api, name])
            (OUT / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            print("wrote", name)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
