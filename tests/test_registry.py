"""pyproject.toml passes the Comfy registry's own pre-publish check, `comfy node validate` of comfy-cli (pinned in
tools/requirements-registry.txt), and the rules the registry server applies on publish, which validate leaves unchecked.

comfy-cli runs from a throw-away venv, .cache/registry-venv/<key>/, built once with `python -m venv` + `pip install -r
tools/requirements-registry.txt`; the key hashes that file (and the Python version), so changing a pin rebuilds it. It
needs the package registry only for that install: a failed install fails the test, it is never skipped.

What `comfy node validate` (comfy-cli 1.23.0) does: parses ./pyproject.toml with comfy-cli's own parser, exits 1 when it
is missing or not TOML or `project.version` is empty, prints a "Warning:" (and exits 0) for a bad license table,
requires-comfyui, a comfyui-frontend-package bound or classifiers, then runs `ruff check . --select S102,S307,E702
--exit-zero` over the current folder (exec, eval, `a; b` on one line: "soon an error", so a failure here). It writes a
.ruff_cache/ there and a config under ~/.config/comfy-cli, so it runs in a temporary copy of pyproject.toml and the
pack's *.py files, with HOME in a temporary folder, telemetry off (DO_NOT_TRACK) and --skip-prompt; it needs no network.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow("builds a venv with comfy-cli from the package index once, then runs it per case")

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
REQUIREMENTS = REPO / "tools" / "requirements-registry.txt"
VENVS = REPO / ".cache" / "registry-venv"
# Not part of the pack (besides every folder whose name starts with a dot: .venv, .cache, .git).
NOT_THE_PACK = {"test-artifacts", "demo-output", "__pycache__", "node_modules"}
PASSED = "All validation checks passed successfully"
# Anything of this kind in validate's output is a finding: an error, a warning, ruff's security findings, a crash.
PROBLEM = re.compile(r"error|warning|traceback|exception|could not|not found", re.IGNORECASE)


def venv_key() -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}".encode()
    return hashlib.sha256(REQUIREMENTS.read_bytes() + b"\0" + python).hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COMFY_", "VIRTUAL_ENV"))}
    env.update(extra)
    return env


def build_venv(venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, env=clean_env())
    assert made.returncode == 0, f"python -m venv {venv} failed:\n{made.stdout}{made.stderr}"
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "--timeout", "60", "--retries", "3", "-r", str(REQUIREMENTS)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"pip install -r {REQUIREMENTS.name} did not finish in {e.timeout} s: is the package registry "
                    "reachable?", pytrace=False)
    if done.returncode != 0:
        out = (done.stdout + done.stderr)[-6000:]
        pytest.fail(f"could not install comfy-cli: `pip install -r tools/{REQUIREMENTS.name}` exited "
                    f"{done.returncode}. Is the package registry (PyPI) reachable from here?\n{out}", pytrace=False)


@pytest.fixture(scope="module")
def registry_python() -> Path:
    """The throw-away venv's python, with comfy-cli installed; built on first use, reused while the pins stay."""
    key = venv_key()
    venv = VENVS / key
    stamp = venv / "installed-from.txt"
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f"{key}.lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)  # two pytest processes must not build the same venv at once
        except ImportError:
            pass
        if not (stamp.is_file() and venv_python(venv).exists()):
            for old in VENVS.iterdir():  # venvs of earlier pins
                if old.is_dir() and old.name != key and re.fullmatch(r"[0-9a-f]{16}", old.name):
                    shutil.rmtree(old, ignore_errors=True)
            build_venv(venv)
            stamp.write_text(REQUIREMENTS.read_text())
    return venv_python(venv)


def validate_env(home: Path) -> dict:
    return clean_env(HOME=str(home), USERPROFILE=str(home), DO_NOT_TRACK="1", COMFY_NO_TELEMETRY="1",
                     RUFF_NO_CACHE="true", NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONUTF8="1")


def comfy_node_validate(python: Path, project: Path) -> tuple[int, str]:
    """`comfy node validate` in `project`; (exit code, stdout + stderr)."""
    home = project.parent / "home"
    home.mkdir(exist_ok=True)
    done = subprocess.run([str(python), "-m", "comfy_cli", "--skip-prompt", "--no-json", "node", "validate"],
                          cwd=project, env=validate_env(home), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


def problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if PROBLEM.search(line)]


def pack_copy(dst: Path, pyproject_text: str | None = None, with_code: bool = True) -> Path:
    """pyproject.toml (ours, or the given text) and, with_code, every *.py of the pack, copied to dst."""
    dst.mkdir(parents=True)
    (dst / "pyproject.toml").write_text(PYPROJECT.read_text() if pyproject_text is None else pyproject_text)
    if with_code:
        for folder, dirs, files in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in NOT_THE_PACK]
            for name in files:
                if name.endswith(".py"):
                    src = Path(folder, name)
                    out = dst / src.relative_to(REPO)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        shutil.copyfile(src, out)
                    except FileNotFoundError:  # removed while we walked
                        pass
    return dst


def edited(key: str, line: str | None) -> str:
    """Our pyproject.toml with the line `key = ...` replaced by `line` (None: removed)."""
    text, n = re.subn(rf"(?m)^{re.escape(key)} = .*\n", "" if line is None else line + "\n", PYPROJECT.read_text())
    assert n == 1, f"pyproject.toml has {n} lines `{key} = ...`"
    return text


def test_comfy_node_validate_passes(registry_python, tmp_path):
    project = pack_copy(tmp_path / "pack")
    rc, out = comfy_node_validate(registry_python, project)
    print(out)
    assert rc == 0, f"comfy node validate exited {rc}:\n{out}"
    assert PASSED in out, out
    assert not problems(out), f"comfy node validate found problems:\n{out}"


@pytest.mark.parametrize("case", ["no version", "not toml", "bad requires-comfyui", "exec in the code"])
def test_comfy_node_validate_rejects_a_broken_pack(registry_python, tmp_path, case):
    """What validate really rejects fails the test above: it is not a check that passes whatever the file says."""
    if case == "no version":
        project = pack_copy(tmp_path / "pack", edited("version", None), with_code=False)
    elif case == "not toml":
        project = pack_copy(tmp_path / "pack", PYPROJECT.read_text() + "\n[tool.comfy\n", with_code=False)
    elif case == "bad requires-comfyui":
        project = pack_copy(tmp_path / "pack", edited("requires-comfyui", 'requires-comfyui = "0.3"'), with_code=False)
    else:
        project = pack_copy(tmp_path / "pack", with_code=False)
        (project / "evil.py").write_text('exec("print(1)")\n')
    rc, out = comfy_node_validate(registry_python, project)
    assert rc != 0 or PASSED not in out or problems(out), f"{case}: validate found nothing:\n{out}"
    expected = {
        "no version": "project version is empty",
        "not toml": "Could not parse",
        "bad requires-comfyui": "Invalid requires-comfyui format",
        "exec in the code": "S102",
    }[case]
    assert expected in out, out
    if case in ("no version", "not toml"):
        assert rc == 1, out


# What `comfy node publish` sends to the registry: comfy-cli's own parse of pyproject.toml, as JSON.
PARSE = ("import dataclasses, json, sys\n"
         "from comfy_cli.registry.config_parser import extract_node_configuration\n"
         "config = extract_node_configuration(sys.argv[1])\n"
         "print(json.dumps(config, default=lambda o: vars(o) if dataclasses.is_dataclass(o) else str(o)))\n")


def parsed_by_comfy_cli(python: Path, pyproject_text: str, tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "pyproject.toml"
    path.write_text(pyproject_text)
    done = subprocess.run([str(python), "-c", PARSE, str(path)], cwd=tmp, env=validate_env(tmp),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads(done.stdout.strip().splitlines()[-1])
    assert config, done.stdout
    return config


def registry_rule_violations(config: dict) -> list[str]:
    """The registry's rules that `comfy node validate` does not check. Node id and publisher id: registry-backend's
    IsValidNodeID / IsValidPublisherID (mapper/node.go, mapper/publisher.go) and `comfy node publish` (both must be
    set); version, "no ComfyUI in the name", no consecutive special characters, license, Repository and Icon:
    https://docs.comfy.org/registry/specifications."""
    project, comfy = config["project"], config["tool_comfy"]
    name, bad = project["name"], []
    if not (1 <= len(name) <= 50):
        bad.append(f"name {name!r}: the node id must be 1 to 50 characters")
    if not re.fullmatch(r"[a-z][a-z0-9\-_]+(\.[a-z0-9\-_]+)*", name):
        bad.append(f"name {name!r}: the node id must be lowercase [a-z0-9-_.] and start with a letter")
    if re.search(r"[-_.]{2}", name):
        bad.append(f"name {name!r}: no consecutive special characters")
    if "comfyui" in name.lower():
        bad.append(f"name {name!r}: the registry asks for no 'ComfyUI' in the node id")
    if not re.fullmatch(r"\d+\.\d+\.\d+", project["version"]):
        bad.append(f"version {project['version']!r}: must be X.Y.Z")
    if not project["description"] or len(project["description"]) > 1000:
        bad.append("description: must be set, at most 1000 characters")
    if not (project["license"]["text"] or project["license"]["file"]):
        bad.append("license: must be {text = ...} or {file = ...}")
    if not re.fullmatch(r"https://\S+", project["urls"]["repository"]):
        bad.append("[project.urls] Repository: must be an https URL")
    if not project["supported_comfyui_version"]:
        bad.append("[tool.comfy] requires-comfyui: missing or not understood by comfy-cli")
    if not re.fullmatch(r"[a-z][a-z0-9-]*", comfy["publisher_id"]):
        bad.append(f"[tool.comfy] PublisherId {comfy['publisher_id']!r}: must match ^[a-z][a-z0-9-]*$")
    if not comfy["display_name"]:
        bad.append("[tool.comfy] DisplayName: must be set")
    icon = comfy["icon"]
    if icon and not re.fullmatch(r"https://\S+\.(svg|png|jpe?g|gif)", icon, re.IGNORECASE):
        bad.append(f"[tool.comfy] Icon {icon!r}: empty, or an https URL of an SVG, PNG, JPG or GIF")
    return bad


def test_pyproject_follows_the_registry_rules(registry_python, tmp_path):
    config = parsed_by_comfy_cli(registry_python, PYPROJECT.read_text(), tmp_path)
    assert registry_rule_violations(config) == []


@pytest.mark.parametrize("key, line, finding", [
    ("name", 'name = "ComfyUI-LoRA-Trainer"', "lowercase"),
    ("name", 'name = "lora--trainer"', "consecutive"),
    ("name", 'name = "comfyui-lora-trainer"', "ComfyUI"),
    ("version", 'version = "0.1"', "X.Y.Z"),
    ("PublisherId", None, "PublisherId"),
    ("Repository", None, "Repository"),
    ("Icon", 'Icon = "icon.png"', "Icon"),
])
def test_registry_rules_catch_a_broken_pyproject(registry_python, tmp_path, key, line, finding):
    config = parsed_by_comfy_cli(registry_python, edited(key, line), tmp_path)
    found = registry_rule_violations(config)
    assert any(finding in f for f in found), found
