"""Real sizes without a GPU (issue 23): one training step of each large family at its published size, on fake
tensors, through this pack's path and through ComfyUI's built-in TrainLoraNode's, side by side.

Per family and setting (bf16 or fp8 base, checkpointing on or off; 1024² images, 480p x 33-frame video, batch 1,
rank 16): the peak by component (weights, adapters, gradients, optimizer state, activations), pack / built-in /
ratio, and FLOPs per step against the minimum (the pack's adapted model forward + backward, plus one more forward
where checkpointing recomputes). Then the targets and whether they hold. See benchmarks/README.md.

    .venv/bin/python benchmarks/real_size.py                          # every family, every setting (long)
    .venv/bin/python benchmarks/real_size.py --only flux_dev --base fp8 --checkpointing on
    .venv/bin/python benchmarks/real_size.py --quick                  # smoke: the tiny SD3, one setting
    .venv/bin/python benchmarks/real_size.py --json out.json          # every figure (appended as each row ends)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import harness  # noqa: E402

GB = 1e9
PEAK_RATIO = 0.7  # pack peak <= 0.7 x the built-in's
FLUX_FP8_LIMIT = 16 * GB  # Flux dev, fp8 base, 1024², batch 1, rank 16, checkpointing: <= 16 GB
FLOP_RATIO = 1.05  # FLOPs <= 1.05 x (minimum + recompute)
COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations")


def quick_case():
    """The tiny SD3 of the test suite (tools/family_models.py) as a Case: the smoke run."""
    import family_models
    from fake_step import Case

    family = family_models.BY_NAME["sd3"]
    built = family_models.build(family)
    return Case("sd3_tiny", family.detected_as, lambda: built.shapes, (16, 32, 32), 8, family.context,
                pooled=family.pooled)


def row_text(label: str, pack: float, builtin: float, unit: float = GB) -> str:
    ratio = f"{pack / builtin:6.2f}" if builtin else "     -"
    return f"    {label:<12} {pack / unit:9.2f} {builtin / unit:9.2f} {ratio}"


def verdicts(case_name: str, setting: dict, pack, builtin, minimum: int | None) -> list[tuple[str, bool, str]]:
    """(target, holds, note) for one family and setting."""
    out = []
    if builtin is not None and not builtin.error and builtin.peak:
        ratio = pack.peak / builtin.peak
        worst = max(COMPONENTS, key=lambda c: getattr(pack, c) - PEAK_RATIO * getattr(builtin, c))
        out.append((f"peak <= {PEAK_RATIO} x built-in", ratio <= PEAK_RATIO,
                    f"{ratio:.2f}; most over its share: {worst} ({getattr(pack, worst) / GB:.2f} vs "
                    f"{getattr(builtin, worst) / GB:.2f} GB)"))
    if case_name.startswith("flux_dev") and setting["base"] == "fp8" and setting["checkpointing"]:
        out.append(("Flux dev fp8 ckpt <= 16 GB", pack.peak <= FLUX_FP8_LIMIT,
                    f"{pack.peak / GB:.2f} GB; activations {pack.activations / GB:.2f} GB, weights "
                    f"{pack.weights / GB:.2f} GB"))
    if minimum and pack.flops:
        bound = minimum + (pack.forward_flops if setting["checkpointing"] else 0)
        out.append((f"FLOPs <= {FLOP_RATIO} x (minimum + recompute)", pack.flops <= FLOP_RATIO * bound,
                    f"{pack.flops / bound:.3f} x"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated family names (tools/real_size_models.py)")
    parser.add_argument("--base", default="bf16,fp8", help="bf16, fp8 or both")
    parser.add_argument("--checkpointing", default="on,off", help="on, off or both")
    parser.add_argument("--nodes", default="pack,builtin")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (faster)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the tiny SD3, bf16, checkpointing on")
    parser.add_argument("--json", type=Path, help="write every figure here (rewritten after each row)")
    args = parser.parse_args(argv)

    harness.load_pack()
    import fake_step
    import real_size_models

    if args.quick:
        cases, bases, ckpts = [quick_case()], ["bf16"], [True]
    else:
        names = [n for n in args.only.split(",") if n]
        unknown = [n for n in names if n not in real_size_models.BY_NAME]
        if unknown:
            parser.error(f"unknown families {unknown}; known: {', '.join(real_size_models.BY_NAME)}")
        cases = [real_size_models.BY_NAME[n] for n in names] if names else list(real_size_models.CASES)
        bases = [b for b in args.base.split(",") if b]
        ckpts = [c == "on" for c in args.checkpointing.split(",") if c]
    nodes = [n for n in args.nodes.split(",") if n]
    results, failures = [], []
    print(f"fake-tensor training step, batch {args.batch}, rank {args.rank}, GB = 1e9 bytes")
    for case in cases:
        minimum = None  # FLOPs of the pack without checkpointing (forward + backward, nothing else)
        for base in bases:
            for ckpt in sorted(ckpts):  # off first: its FLOPs are the minimum
                setting = {"base": base, "checkpointing": ckpt}
                measured = {}
                for node in nodes:
                    start = time.perf_counter()
                    m = fake_step.safe_measure(case, fake_step.Settings(node=node, base=base, checkpointing=ckpt,
                                                                        batch=args.batch, rank=args.rank),
                                               flops=not args.no_flops)
                    measured[node] = m
                    results.append({"family": case.name, "node": node, **setting, "seconds":
                                    round(time.perf_counter() - start, 1), **m.as_dict()})
                pack, builtin = measured.get("pack"), measured.get("builtin")
                if pack is not None and not pack.error and not ckpt and minimum is None:
                    minimum = pack.flops
                print(f"\n{case.name} ({(pack or builtin).parameters / 1e9:.2f} B), {base} base, checkpointing "
                      f"{'on' if ckpt else 'off'}")
                for name, m in measured.items():
                    if m.error:
                        print(f"    {name}: FAILED {m.error}")
                        failures.append((case.name, name, m.error))
                if pack is None or pack.error:
                    continue
                empty = fake_step.Measurement()
                other = builtin if builtin is not None and not builtin.error else empty
                unit, unit_name = (GB, "GB") if pack.peak >= 0.1 * GB else (1e6, "MB")
                print(f"    {unit_name:<12} {'pack':>9} {'built-in':>9} {'ratio':>6}")
                for c in COMPONENTS:
                    print(row_text(c, getattr(pack, c), getattr(other, c), unit))
                print(row_text("peak", pack.peak, other.peak, unit))
                if pack.flops:
                    print(row_text("GFLOP/step", pack.flops, other.flops, 1e9))
                for target, holds, note in verdicts(case.name, setting, pack, builtin, minimum):
                    print(f"    target {target}: {'holds' if holds else 'FAILS'} ({note})")
                    results[-1].setdefault("targets", []).append({"target": target, "holds": holds, "note": note})
                if args.json:
                    args.json.write_text(json.dumps({"results": results}, indent=1))
    if failures:
        print(f"\n{len(failures)} measurement(s) failed: " + "; ".join(f"{f} {n}: {e}" for f, n, e in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
