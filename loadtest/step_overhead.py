"""Per-step host overhead of the engine: where a decode step's time goes outside the model.

Runs greedy decodes (EOS ignored) at batch 1 and 16 on the default model and splits
each step's wall time into: the model's forward and logits (the kernels' share),
the rest of `ModelRunner.execute` (batch build, attention plan, sampling, the one
device sync), and the rest of `EngineCore.step` (schedule, update, detokenize and
stop checks, outputs). Timers wrap the three calls (no other instrumentation);
medians over --steps steps after warm-up. --json writes the figures.

    python loadtest/step_overhead.py --json loadtest/results/step_overhead_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Timed:
    """Wraps a callable and records each call's seconds (appended to `times`)."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t0)


def measure(llm, batch: int, steps: int) -> dict:
    from engine import SamplingParams

    core, model = llm.core, llm.core.runner.model
    params = SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        core.add_request(f"b{batch}-{i}", f"Write a long story about the number {i}.", params)
    for _ in range(8):  # prefill and warm-up
        core.step()
    forward, logits = Timed(model.forward), Timed(model.compute_logits)
    execute = Timed(core.guard._execute)  # the guard holds the runner's bound execute
    model.forward, model.compute_logits, core.guard._execute = forward, logits, execute
    totals = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            core.step()
            totals.append(time.perf_counter() - t0)
    finally:
        del model.forward, model.compute_logits  # back to the class methods
        core.guard._execute = execute.fn
    for rid in list(core.groups):
        core.abort(rid)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    compute = [f + g for f, g in zip(forward.times, logits.times)]
    runner_rest = [e - c for e, c in zip(execute.times, compute)]
    core_rest = [t - e for t, e in zip(totals, execute.times)]
    row = {"batch": batch, "step_ms": ms(totals), "model_ms": ms(compute), "runner_host_ms": ms(runner_rest),
           "core_host_ms": ms(core_rest)}
    row["host_ms"] = row["runner_host_ms"] + row["core_host_ms"]
    row["host_share"] = row["host_ms"] / row["step_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    from engine import LLM

    llm = LLM(model="smollm2-135m")
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        row = measure(llm, batch, args.steps)
        rows.append(row)
        print(f"batch {batch:2d}: step {row['step_ms']:6.2f} ms = model {row['model_ms']:6.2f} + runner host "
              f"{row['runner_host_ms']:5.2f} + core host {row['core_host_ms']:5.2f} "
              f"(host {100 * row['host_share']:4.1f}%)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
