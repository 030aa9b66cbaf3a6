"""Shared fixtures: the real ComfyUI server with this pack (and the test-only node pack) installed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(REPO / "tools"))
if str(REPO) not in sys.path:  # tests.tiers, tests.hostile_checks
    sys.path.append(str(REPO))

import harness  # noqa: E402
from tests.tiers import pytest_addoption, pytest_collection_modifyitems, pytest_configure  # noqa: E402,F401  the tier guard

TEST_NODE_PACK = TESTS / "node_packs" / "lora_trainer_test_nodes"


def _share_the_cores() -> None:
    """Under pytest-xdist, each of the N workers (and the ComfyUI servers and subprocesses it starts, which inherit
    the setting) gets its share of the cores for torch's threads: N workers with all cores each would oversubscribe
    the machine. Every process of a worker uses the same thread count, so a server and a headless run of the same
    workflow still agree bit for bit."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


_share_the_cores()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> harness.ComfyServer:
    """One real ComfyUI (``main.py --cpu``) for the session, base directory in a tmp folder, stopped at the end."""
    base = tmp_path_factory.mktemp("comfy_base")
    harness.put_comfyui_on_path()
    import tiny_models

    tiny_models.write_tiny_sd3(base / "models" / "diffusion_models" / "tiny_sd3.safetensors")
    tiny_models.write_model(base / "models" / "diffusion_models" / "tiny_wan.safetensors", tiny_models.tiny_wan_state_dict)
    server = harness.ComfyServer(base, extra_node_packs=(TEST_NODE_PACK,))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(comfy_server: harness.ComfyServer, request) -> harness.ComfyServer:
    """The session's server, remembering where its log stood so a failing test gets the log of its own run."""
    request.node._comfy_log = (comfy_server, len(comfy_server.log_text()))
    return comfy_server


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = getattr(item, "_comfy_log", None)
    if marker and report.failed:
        srv, start = marker
        report.sections.append(("ComfyUI server log (this test)", srv.log_text()[start:][-20000:]))
