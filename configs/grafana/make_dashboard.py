"""Writes configs/grafana/dashboards/strix.json, the provisioned Grafana dashboard.

    python configs/grafana/make_dashboard.py

The JSON is committed; tests/unit/test_dashboard.py checks it equals this
script's output, and tests/e2e/test_prometheus_dashboard.py evaluates every
expression against a real Prometheus. A feature that adds metrics adds its
row to ROWS and re-runs this script.

`$model_name` selects the served model (every strix series carries the
label); `$job` selects the scrape job for the process collector's series,
which have no model label. Rates use `$__rate_interval`.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "strix.json"
SEL = '{model_name="$model_name"}'
RATE = "[$__rate_interval]"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


def rate(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group}(rate({metric}{SEL}{RATE}))"


def quantiles(histogram: str) -> list[tuple[str, str]]:
    """p50/p90/p99 of a histogram over the rate window."""
    return [(f"p{int(q * 100)}",
             f"histogram_quantile({q}, sum by (le)(rate({histogram}_bucket{SEL}{RATE})))")
            for q in (0.5, 0.9, 0.99)]


def mean(histogram: str) -> tuple[str, str]:
    return ("mean", f"{rate(histogram + '_sum')} / {rate(histogram + '_count')}")


# (row title, [(panel title, unit, [(legend, expr), ...]), ...])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Throughput", [
        ("Output tokens/s", "short", [("generated", rate("strix:generation_tokens_total"))]),
        ("Prompt tokens/s", "short", [("prefill", rate("strix:prompt_tokens_total"))]),
        ("Finished requests/s by reason", "reqps",
         [("{{finished_reason}}", rate("strix:request_success_total", "finished_reason"))]),
        ("Aborted requests/s", "reqps", [("aborted", rate("strix:request_aborted_total"))]),
    ]),
    ("Scheduler and KV cache", [
        ("Requests running / waiting", "short",
         [("running", f"sum(strix:num_requests_running{SEL})"),
          ("waiting", f"sum(strix:num_requests_waiting{SEL})")]),
        ("KV-cache usage", "percentunit", [("used", f"max(strix:kv_cache_usage_perc{SEL})")]),
        ("Prefix-cache hit rate", "percentunit",
         [("hit rate", f"{rate('strix:prefix_cache_hits_total')} / "
                       f"{rate('strix:prefix_cache_queries_total')}")]),
        ("Preemptions/s", "short", [("preempted", rate("strix:num_preemptions_total"))]),
    ]),
    ("Latency", [
        ("Time to first token", "s", quantiles("strix:time_to_first_token_seconds")),
        ("Inter-token latency", "s", quantiles("strix:inter_token_latency_seconds")),
        ("Time per output token", "s", quantiles("strix:time_per_output_token_seconds")),
        ("End-to-end request latency", "s", quantiles("strix:e2e_request_latency_seconds")),
        ("Queue time", "s", quantiles("strix:request_queue_time_seconds")),
    ]),
    ("Engine", [
        ("Step time", "s", quantiles("strix:step_duration_seconds")
         + [mean("strix:step_duration_seconds")]),
        ("Batch size (sequences per step)", "short",
         quantiles("strix:batch_size") + [mean("strix:batch_size")]),
        ("Prompt / output length", "short",
         [("prompt p50", quantiles("strix:request_prompt_tokens")[0][1]),
          ("output p50", quantiles("strix:request_generation_tokens")[0][1])]),
        ("Process CPU (cores)", "short",
         [("cpu", 'sum(rate(process_cpu_seconds_total{job="$job"}' + RATE + "))")]),
        ("Process memory", "bytes",
         [("resident", 'sum(process_resident_memory_bytes{job="$job"})'),
          ("virtual", 'sum(process_virtual_memory_bytes{job="$job"})')]),
    ]),
    ("Structured outputs", [
        ("Constrained requests/s by kind", "reqps",
         [("{{kind}}", rate("strix:structured_requests_total", "kind"))]),
        ("Grammar compile time", "s", quantiles("strix:grammar_compile_seconds")),
        ("Grammar errors/s, fast-forward tokens/s", "short",
         [("compile errors", rate("strix:grammar_compile_errors_total")),
          ("fast-forward tokens", rate("strix:fast_forward_tokens_total"))]),
    ]),
    ("Speculative decoding", [
        ("Draft acceptance rate", "percentunit",
         [("accepted / drafted", f"{rate('strix:spec_decode_num_accepted_tokens_total')} / "
                                 f"{rate('strix:spec_decode_num_draft_tokens_total')}")]),
        ("Draft and accepted tokens/s", "short",
         [("drafted", rate("strix:spec_decode_num_draft_tokens_total")),
          ("accepted", rate("strix:spec_decode_num_accepted_tokens_total")),
          ("verified requests", rate("strix:spec_decode_num_drafts_total"))]),
        ("Draft length (controller's k)", "short",
         [mean("strix:spec_decode_draft_length")] + quantiles("strix:spec_decode_draft_length")[2:]),
    ]),
    ("Shared-prefix attention", [
        ("Decomposed shared-prefix levels", "short",
         [("levels (last step)", "strix:shared_prefix_groups")]),
        ("Prefix tokens read through a shared KV read /s", "short",
         [("tokens", rate("strix:shared_prefix_tokens_total"))]),
    ]),
]


def panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]],
          pos: tuple[int, int]) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": title, "datasource": DATASOURCE,
        "gridPos": {"x": pos[0], "y": pos[1], "w": 8, "h": 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend} for i, (legend, expr) in enumerate(targets)],
    }


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": False, "multi": False, "current": {}}


def build() -> dict:
    panels: list[dict] = []
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": row_title,
                       "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
                       "panels": []})
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            x, dy = (i % 3) * 8, (i // 3) * 8
            panels.append(panel(len(panels) + 1, title, unit, targets, (x, y + dy)))
        y += ((len(row_panels) + 2) // 3) * 8
    return {
        "uid": "strix-overview", "title": "strix", "tags": ["strix", "llm"],
        "schemaVersion": 39, "version": 1, "editable": False, "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"}, "timezone": "",
        "templating": {"list": [
            variable("model_name", "model", "label_values(strix:num_requests_running, model_name)"),
            variable("job", "job", "label_values(process_cpu_seconds_total, job)"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
