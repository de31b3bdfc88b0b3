"""Turn committed benchmark JSON into PNG plots.

    python loadtest/plot.py loadtest/results/http_load_cpu_c*.json -o loadtest/results/http_load_cpu.png
    python loadtest/plot.py loadtest/results/structured_cpu.json -o loadtest/results/structured_cpu.png
    python loadtest/plot.py loadtest/results/soak_cpu.json -o loadtest/results/soak_cpu.png
    python loadtest/plot.py loadtest/results/spec_cpu.json -o loadtest/results/spec_cpu.png
    python loadtest/plot.py loadtest/results/spec_cpu.json loadtest/results/spec_cpu_draft.json \
        loadtest/results/spec_cpu_recycling.json loadtest/results/spec_cpu_layerskip.json \
        -o loadtest/results/spec_cpu_drafters.png
    python loadtest/plot.py loadtest/results/shared_prefix_cpu.json -o loadtest/results/shared_prefix_cpu.png
    python loadtest/plot.py loadtest/results/http_compare_cpu.json -o loadtest/results/http_compare_cpu.png
    python loadtest/plot.py loadtest/results/http_compare_cpu.json loadtest/results/http_compare_cpu_q8.json \
        loadtest/results/offline_throughput_cpu_native.json -o loadtest/results/native_cpu.png

The kind of each file is read from its keys: `http_load.py` results (one per
concurrency: output tokens/s and TTFT/ITL p50/p90/p99 vs concurrency, files with
the same `--label` prefix drawn as one series), `structured_bench.py` results
(coverage/compliance per split against the published best, TPOT constrained
vs unconstrained), `soak.py` results (RSS over the run) and `spec_bench.py`
results (tokens/s vs batch size, one line per configuration, per workload; several
files: one per drafter, adaptive and best fixed k against each run's no speculation);
`http_compare.py` results (tokens/s, TTFT and ITL p50 vs concurrency, one line per server);
`http_compare.py` files together with `offline_throughput.py` results (tokens/s vs concurrency
through HTTP, ours per file and llama-server, next to offline tokens/s vs batch, ours and HF).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def kind_of(data: dict) -> str:
    if data.get("kind") in ("shared_prefix", "shared_prefix_attention", "http_compare"):
        return data["kind"]
    if "splits" in data and "tpot_c16" in data:
        return "structured"
    if "rss_samples_kib" in data or "rss_samples_kib" in data.get("summary", {}):
        return "soak"  # before http_load: a soak's config has a concurrency too
    if "rows" in data and "summary" in data and "linear_path" in data:
        return "spec"
    if "summary" in data and "concurrency" in data.get("config", {}):
        return "http_load"
    if "all_runs_columns" in data:
        return "offline_throughput"
    raise ValueError(f"unknown results file (keys: {sorted(data)})")


def plot_http_load(files: list[tuple[str, dict]], out: Path) -> None:
    """Throughput, TTFT and ITL percentiles vs concurrency; one line per `--label` series."""
    series: dict[str, list[tuple[int, dict]]] = collections.defaultdict(list)
    for name, data in files:
        label = data["config"].get("label") or "ours"
        series[label].append((data["config"]["concurrency"], data["summary"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    styles = {50: "-", 90: "--", 99: ":"}
    for color, (label, points) in zip(COLORS, series.items()):
        points.sort(key=lambda p: p[0])
        xs = [c for c, _ in points]
        axes[0].plot(xs, [s.get("output_tokens_per_s") for _, s in points], marker="o",
                     color=color, label=label)
        for ax, metric in ((axes[1], "ttft"), (axes[2], "itl")):
            for q, style in styles.items():
                ys = [s.get(f"{metric}_ms_p{q}") for _, s in points]
                if any(y is not None for y in ys):  # older results have no p90
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], style,
                            marker="o", color=color, label=f"{label} p{q}")
    axes[0].set(xlabel="concurrency", ylabel="output tokens/s", title="throughput")
    axes[1].set(xlabel="concurrency", ylabel="ms", title="time to first token", yscale="log")
    axes[2].set(xlabel="concurrency", ylabel="ms", title="inter-token latency", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_structured(data: dict, out: Path) -> None:
    splits = list(data["splits"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.2
    keys = ("declared_coverage", "empirical_coverage", "compliance", "published_best")
    for k, key in enumerate(keys):
        values = [data["splits"][s][key] or 0 for s in splits]
        ax1.bar([i + (k - 1.5) * width for i in range(len(splits))], values, width, label=key)
    ax1.set_xticks(range(len(splits)), splits)
    ax1.set(ylim=(0, 1.05), title="JSONSchemaBench dev (sampled)")
    ax1.legend(fontsize=8)
    labels, cons, plain = [], [], []
    for c in ("tpot_c1", "tpot_c16"):
        labels.append(c.replace("tpot_", "concurrency "))
        cons.append(data[c]["constrained"]["tpot_mean_ms"])
        plain.append(data[c]["unconstrained"]["tpot_mean_ms"])
    ax2.bar([i - 0.2 for i in range(2)], plain, 0.4, label="unconstrained")
    ax2.bar([i + 0.2 for i in range(2)], cons, 0.4, label="constrained")
    ax2.set_xticks(range(2), labels)
    ax2.set(ylabel="TPOT ms", title="time per output token")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_soak(data: dict, out: Path) -> None:
    samples = _find(data, "rss_samples_kib") or []
    fig, ax = plt.subplots(figsize=(7, 4))
    if samples:
        ax.plot([s[0] for s in samples], [s[1] / 1024 for s in samples])
    ax.set(xlabel="s", ylabel="RSS MiB", title="soak: server RSS")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_spec(data: dict, out: Path | str) -> None:
    """Tokens/s vs batch size per configuration; one panel per (mode, workload)."""
    panels = sorted({(r["mode"], r["workload"]) for r in data["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (mode, workload) in zip(axes[0], panels):
        rows = [r for r in data["rows"] if (r["mode"], r["workload"]) == (mode, workload)]
        labels = list(dict.fromkeys(r["config"] for r in rows))
        for color, label in zip(COLORS, labels):
            points = sorted((r["batch"], r["tokens_per_s"]) for r in rows if r["config"] == label)
            ax.plot([b for b, _ in points], [t for _, t in points], marker="o", color=color, label=label,
                    linewidth=2.5 if label.endswith("adaptive") else 1.2)
        ax.set(xscale="log", xlabel="batch size", ylabel="output tokens/s", title=f"{mode}: {workload}")
        ax.set_xticks(sorted({r["batch"] for r in rows}), [str(b) for b in sorted({r["batch"] for r in rows})])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"speculative decoding ({data.get('linear_path', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def spec_method(data: dict) -> str:
    """The drafter a spec_bench file measured ("draft (q8 smollm2-135m)" for a model draft)."""
    label = next(r["config"] for r in data["rows"] if r["config"].endswith("adaptive"))
    method = label[:-len(" adaptive")]
    draft = data.get("draft") or {}
    if method == "draft" and draft.get("model"):
        quant = draft.get("activation_quant") or ""
        method += f" ({quant + ' ' if quant and quant != 'none' else ''}{draft['model']})"
    return method


def plot_spec_drafters(files: list[dict], out: Path | str) -> None:
    """Offline tokens/s vs batch size, one panel per workload: no speculation (from each
    file's own run, dotted) and, per drafter, adaptive (solid) and its best fixed k (dashed)."""
    workloads = sorted({r["workload"] for d in files for r in d["rows"]})
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        for color, data in zip(COLORS, files):
            rows = [r for r in data["rows"] if r["mode"] == "offline" and r["workload"] == workload]
            batches = sorted({r["batch"] for r in rows})
            method = spec_method(data)

            def series(pick):
                return [max((r["tokens_per_s"] for r in rows if r["batch"] == b and pick(r["config"])),
                            default=float("nan")) for b in batches]
            ax.plot(batches, series(lambda c: c.endswith("adaptive")), marker="o", color=color,
                    linewidth=2.2, label=f"{method} adaptive")
            ax.plot(batches, series(lambda c: " k=" in c), marker=".", color=color, linestyle="--",
                    linewidth=1, label=f"{method} best fixed k")
            ax.plot(batches, series(lambda c: c == "no spec"), color=color, linestyle=":", linewidth=1,
                    label=f"no spec ({method} run)")
        ticks = sorted({r["batch"] for d in files for r in d["rows"]})
        ax.set(xscale="log", xlabel="batch size", ylabel="output tokens/s", title=f"offline: {workload}")
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"speculative decoding by drafter ({files[0].get('linear_path', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_shared_prefix(data: dict, out: Path | str) -> None:
    """Decode tokens/s vs shared prefix length, one line per mode (and llama-server); one
    panel per batch size."""
    batches = sorted({r["batch"] for r in data["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in data["rows"] if r["batch"] == batch]
        for color, mode in zip(COLORS, dict.fromkeys(r["mode"] for r in rows)):
            points = sorted((r["prefix"], r["decode_tok_s"]) for r in rows if r["mode"] == mode)
            ax.plot([p for p, _ in points], [t for _, t in points], marker="o", color=color, label=mode)
        ax.set(xscale="log", yscale="log", xlabel="shared prefix tokens (P)", ylabel="decode tokens/s",
               title=f"B = {batch} streams")
        prefixes = sorted({r["prefix"] for r in rows})
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log minor labels overlap
        ax.set_xticks(prefixes, [str(p) for p in prefixes])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("shared-prefix attention through HTTP (16 warm decode steps where P >= "
                 f"{data.get('meta', {}).get('long_from', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_shared_prefix_attention(data: dict, out: Path | str) -> None:
    """Attention-only: step time (all layers) off vs on vs P, one line per batch size."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, batch in zip(COLORS, sorted({r["batch"] for r in data["rows"]})):
        rows = sorted((r for r in data["rows"] if r["batch"] == batch), key=lambda r: r["prefix"])
        xs = [r["prefix"] for r in rows]
        ax.plot(xs, [r["off_ms"] for r in rows], "--", marker="o", color=color, label=f"B={batch} off")
        ax.plot(xs, [r["on_ms"] for r in rows], "-", marker="o", color=color, label=f"B={batch} on")
    ax.set(xscale="log", yscale="log", xlabel="shared prefix tokens", ylabel="attention ms per decode step")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_http_compare(data: dict, out: Path | str) -> None:
    """Output tokens/s, median TTFT and median ITL vs concurrency; one line per server."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("output_tok_s", 1, "output tokens/s", "throughput"),
              ("ttft_p50_s", 1000, "ms", "time to first token, p50"),
              ("itl_p50_s", 1000, "ms", "inter-token latency, p50"))
    for color, server in zip(COLORS, dict.fromkeys(r["server"] for r in data["rows"])):
        rows = sorted((r for r in data["rows"] if r["server"] == server), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        for ax, (key, scale, _, _) in zip(axes, panels):
            ys = [float("nan") if r.get(key) is None else r[key] * scale for r in rows]
            ax.plot(xs, ys, marker="o", color=color, label=server)
    concurrencies = sorted({r["concurrency"] for r in data["rows"]})
    for ax, (_, _, ylabel, title) in zip(axes, panels):
        ax.set(xlabel="concurrency", ylabel=ylabel, title=title)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    meta = data.get("meta", {})
    fig.suptitle(f"HTTP /v1/completions, {meta.get('model', '?')}, max_tokens {meta.get('max_tokens', '?')}, "
                 f"{meta.get('machine', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_native_summary(compares: list[dict], offline: dict, out: Path | str) -> None:
    """Left: HTTP output tokens/s vs concurrency, our server per compare file (labelled by its
    `server_args`) and llama-server from each. Right: offline tokens/s vs batch, ours and HF."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = iter(COLORS)
    for data in compares:
        args = data.get("meta", {}).get("server_args") or "fp32"
        for server in dict.fromkeys(r["server"] for r in data["rows"]):
            rows = sorted((r for r in data["rows"] if r["server"] == server), key=lambda r: r["concurrency"])
            label = f"ours ({args})" if server == "ours" else f"{server} (run with ours {args})"
            left.plot([r["concurrency"] for r in rows], [r["output_tok_s"] for r in rows], marker="o",
                      color=next(colors), label=label, linestyle="-" if server == "ours" else "--")
    concurrencies = sorted({r["concurrency"] for d in compares for r in d["rows"]})
    left.set(xlabel="concurrency", ylabel="output tokens/s", title="HTTP streaming, greedy")
    left.set_xticks(concurrencies, [str(c) for c in concurrencies])
    batches = sorted(int(k[len("batch"):]) for k in offline if k.startswith("batch"))
    series = {"ours_tok_s": "ours (fp32)", "ours_q8_tok_s": "ours (q8)", "hf_tok_s": "HF generate (fp32)"}
    for key, label in series.items():
        ys = [offline[f"batch{b}"].get(key, float("nan")) for b in batches]
        right.plot(batches, ys, marker="o", color=next(colors), label=label)
    right.set(xscale="log", xlabel="batch size", ylabel="tokens/s", title="offline generate")
    right.set_xticks(batches, [str(b) for b in batches])
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"native GGUF kernels, {compares[0].get('meta', {}).get('model', '?')}, "
                 f"{offline.get('threads', '?')} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _find(data: object, key: str) -> object:
    """The first value under `key` anywhere in nested dicts."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    loaded = [(f, json.loads(Path(f).read_text())) for f in args.files]
    kinds = {kind_of(d) for _, d in loaded}
    if kinds == {"http_compare", "offline_throughput"}:
        compares = [d for _, d in loaded if kind_of(d) == "http_compare"]
        offline = [d for _, d in loaded if kind_of(d) == "offline_throughput"]
        plot_native_summary(compares, offline[-1], Path(args.output))
        print(args.output)
        return 0
    if len(kinds) != 1:
        sys.exit(f"error: mixed result kinds {sorted(kinds)}")
    kind = kinds.pop()
    out = Path(args.output)
    if kind == "http_load":
        plot_http_load(loaded, out)
    elif kind == "structured":
        plot_structured(loaded[0][1], out)
    elif kind == "spec" and len(loaded) > 1:
        plot_spec_drafters([d for _, d in loaded], out)
    elif kind == "spec":
        plot_spec(loaded[0][1], out)
    elif kind == "shared_prefix":
        plot_shared_prefix(loaded[0][1], out)
    elif kind == "shared_prefix_attention":
        plot_shared_prefix_attention(loaded[0][1], out)
    elif kind == "http_compare":
        plot_http_compare(loaded[0][1], out)
    else:
        plot_soak(loaded[0][1], out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
