"""Runs a saved API-format workflow with ComfyUI's own executor, without a server or a browser.

    python headless/run.py workflow_api.json [--comfyui DIR] [--base-directory DIR] [--output-directory DIR]
                           [--set node_id.input=value ...] [--cpu] [-v] [-- COMFYUI_ARGS ...]

Arguments after ``--`` go to ComfyUI's own argument parser, as if given to its main.py (e.g. ``--fp32-text-enc``).
Exit codes: 0 done, 1 a node failed, 2 bad arguments / workflow / override, or ComfyUI's validation refused the
workflow, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (what torchrun and job schedulers send), which is a cancel
too. An error is one line on stderr (under torchrun prefixed with the rank); ``-v`` adds the traceback.

Runnable as a file (``python headless/run.py``, which is also how torchrun starts a script) and as a module from the
pack's folder (``python -m headless.run``).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

PACK_DIR = Path(os.path.abspath(__file__)).parent.parent  # not resolved: a symlink in custom_nodes/ stays one


def _import_as_package() -> None:
    """Makes ``headless`` importable as a package and takes the pack's folders off sys.path: a script's folder (or,
    for ``-m``, the current one) heads sys.path, and the pack's ``nodes/`` there would hide ComfyUI's ``nodes.py``."""
    here = {os.path.realpath(PACK_DIR), os.path.realpath(PACK_DIR / "headless")}
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) not in here]
    if "headless" not in sys.modules:
        sys.path.insert(0, str(PACK_DIR))
        try:
            import headless  # noqa: F401
        finally:
            sys.path.remove(str(PACK_DIR))


_import_as_package()
if not __package__:
    __package__ = "headless"  # PEP 366: relative imports below work when run as a file too

from . import comfy_host, ranks, workflow  # noqa: E402
from .report import QuietLog, Report, one_line  # noqa: E402
from .stand_in import HeadlessServer  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM both become ComfyUI's cancel: they raise KeyboardInterrupt in the main thread,
    and the running training keeps its finished steps. SIGTERM is how torchrun passes on its own stop (and how job
    schedulers and ``kill`` stop a job); its default would end the process at once, saving and saying nothing. A
    signal this process was started with ignored stays ignored."""

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.last = signal.SIGINT

    def install(self) -> None:
        for sig in self.NAMES:
            if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
                signal.signal(sig, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        self.last = signal.Signals(signum)
        raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return self.NAMES[self.last]

    @property
    def exit_code(self) -> int:
        return 128 + int(self.last)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options, and the ComfyUI arguments: those after ``--`` plus the ones our options stand for."""
    ours, comfy_extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="headless/run.py", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to ComfyUI's own parser (those of its main.py).")
    parser.add_argument("workflow", type=Path, help="API-format workflow JSON (Export (API)), or a POST /prompt body")
    parser.add_argument("--comfyui", metavar="DIR",
                        help="ComfyUI folder (default: $COMFYUI_DIR, else the ComfyUI this pack is installed in)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                        help="override an input (value parsed as JSON, else taken as a string); repeatable")
    parser.add_argument("--base-directory", metavar="DIR",
                        help="ComfyUI's --base-directory: models/, custom_nodes/, input/, output/, user/ live there")
    parser.add_argument("--output-directory", metavar="DIR", help="ComfyUI's --output-directory")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (default when there is no GPU)")
    parser.add_argument("-v", "--verbose", action="store_true", help="ComfyUI's log at INFO level; tracebacks")
    opts = parser.parse_args(ours)
    comfy_argv = list(comfy_extra)
    if opts.base_directory:
        comfy_argv += ["--base-directory", os.path.abspath(opts.base_directory)]
    if opts.output_directory:
        comfy_argv += ["--output-directory", os.path.abspath(opts.output_directory)]
    if opts.cpu:
        comfy_argv.append("--cpu")
    return opts, comfy_argv


def main(argv: list[str] | None = None) -> int:
    opts, comfy_argv = parse_args(sys.argv[1:] if argv is None else argv)
    # Under torchrun rank 0 prints the progress; every rank prints its own errors and log, named by its rank.
    label = f"rank {ranks.rank()}: " if ranks.world_size() > 1 else ""
    report = Report(open(os.devnull, "w") if ranks.rank() > 0 else sys.stdout, sys.stderr, verbose=opts.verbose,
                    label=label)
    quiet_log = QuietLog(opts.verbose)
    logging.basicConfig(level=logging.INFO if opts.verbose else logging.WARNING, stream=sys.stderr,
                        format=label.replace("%", "%%") + "%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet_log)
    stop = StopSignals()
    stop.install()
    code = EXIT_FAILED
    try:
        ranks.join()
        code = run(opts, comfy_argv, report, quiet_log, stop)
    except KeyboardInterrupt:  # before the prompt runs (joining, loading ComfyUI, validating): nothing to cancel
        report.interrupted(None)
        code = stop.exit_code
    except Exception as e:  # noqa: BLE001 - a bug of the runner or ComfyUI: one line, the traceback under -v
        report.crashed(f"{type(e).__name__}: {one_line(str(e))}", traceback.format_exc())
    finally:
        ranks.leave(succeeded=code == EXIT_OK)
    return code


def run(opts: argparse.Namespace, comfy_argv: list[str], report: Report, quiet_log: QuietLog,
        stop: StopSignals) -> int:
    try:
        prompt = workflow.load(opts.workflow)
        overrides = [workflow.parse_override(text) for text in opts.overrides]
        workflow.check_nodes(prompt, overrides)
        comfyui = comfy_host.find_comfyui(opts.comfyui, PACK_DIR)
    except (workflow.WorkflowError, comfy_host.HostError) as e:
        report.crashed(str(e))
        return EXIT_USAGE
    quiet_log.executor_file = comfy_host.executor_file(comfyui)

    stand_in = HeadlessServer(report.on_message)
    try:
        args = comfy_host.configure(comfyui, comfy_argv)
        comfy_host.load_nodes(stand_in, args)
    except comfy_host.HostError as e:
        report.crashed(str(e))
        return EXIT_USAGE
    logging.getLogger(__name__).info("ComfyUI %s at %s", comfy_host.comfyui_version(), comfyui)

    try:
        prompt = workflow.apply_overrides(prompt, overrides, comfy_host.declared_inputs)
    except workflow.WorkflowError as e:
        report.crashed(str(e))
        return EXIT_USAGE
    prompt_id = str(uuid.uuid4())
    report.prompt = prompt
    checked = comfy_host.validate(prompt, prompt_id, stand_in)
    report.prompt = checked.prompt
    # The server runs the valid outputs of a partly invalid prompt and drops the rest silently; a script must not.
    if not checked.ok or checked.node_errors:
        report.validation_failed(checked.error, checked.node_errors)
        return EXIT_USAGE
    comfy_host.install_progress_hook(stand_in, report.on_progress)
    return execute(checked.prompt, prompt_id, checked.outputs, stand_in, report, stop)


def execute(prompt: dict, prompt_id: str, outputs: list[str], stand_in: HeadlessServer, report: Report,
            stop: StopSignals) -> int:
    """Runs the prompt in a worker thread, as the server's prompt worker does, so that Ctrl-C (or SIGTERM) reaches
    this (main) thread as KeyboardInterrupt and becomes ComfyUI's cancel: the running node stops cleanly at its next
    check."""
    result: dict[str, object] = {}
    done = threading.Event()

    def work() -> None:
        try:
            result["outcome"] = comfy_host.execute(prompt, prompt_id, outputs, stand_in)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            result["crash"] = (e, traceback.format_exc())
        finally:
            done.set()

    threading.Thread(target=work, name="headless-prompt", daemon=True).start()
    interrupted = False
    while not done.is_set():
        try:
            # A plain sleep: a KeyboardInterrupt inside Thread.join() can leave the thread looking finished (CPython).
            time.sleep(0.1)
        except KeyboardInterrupt:
            if interrupted:  # a second stop: the user will not wait for the node to stop
                report.interrupted(None)
                os._exit(stop.exit_code)
            interrupted = True
            report.interrupting(stop.name)
            comfy_host.interrupt()
    if "crash" in result:
        error, trace = result["crash"]  # type: ignore[misc]
        report.crashed(f"ComfyUI's executor raised {type(error).__name__}: {one_line(str(error))}", trace)
        return EXIT_FAILED
    outcome: comfy_host.Outcome = result["outcome"]  # type: ignore[assignment]
    if outcome.interrupted or interrupted:
        report.interrupted(outcome.error)
        # A rank stopped by another rank's cancel (the training agrees on the step to stop at) was sent no signal.
        return stop.exit_code
    if not outcome.success:
        report.failed(outcome.error or {})
        return EXIT_FAILED
    report.succeeded(outcome.outputs, outcome.seconds)
    return EXIT_OK


if __name__ == "__main__":
    ranks.exit_now(main())
