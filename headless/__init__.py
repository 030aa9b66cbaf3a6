"""Headless runner: executes a saved API-format workflow with ComfyUI's own executor, without server or browser.

``python headless/run.py workflow_api.json`` (see run.py). ComfyUI never imports this package: the pack's
``__init__.py`` does not reference it, so the node pack loads exactly as before.
"""
