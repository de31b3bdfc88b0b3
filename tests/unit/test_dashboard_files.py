"""The committed dashboard is the generator's output; plot.py renders committed results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "configs" / "grafana"))
import make_dashboard  # noqa: E402


def test_committed_dashboard_is_generated():
    committed = (REPO / "configs" / "grafana" / "dashboards" / "strix.json").read_text()
    assert committed == make_dashboard.render(), "re-run python configs/grafana/make_dashboard.py"


def test_dashboard_panels_have_unique_ids_and_targets():
    data = json.loads(make_dashboard.render())
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in data["panels"] if p["type"] != "row"]
    assert all(p["targets"] and p["datasource"]["uid"] == "prometheus" for p in graphs)
    titles = " ".join(p["title"] for p in graphs).lower()
    for wanted in ("output tokens", "prompt tokens", "running", "kv-cache", "prefix-cache",
                   "first token", "inter-token", "end-to-end", "queue", "reason", "preemptions",
                   "aborted", "step time", "batch size", "time per output token", "cpu",
                   "memory"):
        assert wanted in titles, wanted


@pytest.mark.parametrize("files", [["http_load_cpu_c1.json", "http_load_cpu_c8.json",
                                    "http_load_cpu_c16.json"],
                                   ["structured_cpu.json"], ["soak_cpu.json"], ["spec_cpu.json"],
                                   ["spec_cpu.json", "spec_cpu_draft.json", "spec_cpu_recycling.json"],
                                   ["http_compare_cpu.json", "http_compare_cpu_q8.json",
                                    "offline_throughput_cpu_native.json"]])
def test_plot_renders_png(tmp_path, files):
    out = tmp_path / "plot.png"
    paths = [str(REPO / "loadtest" / "results" / f) for f in files]
    subprocess.run([sys.executable, str(REPO / "loadtest" / "plot.py"), *paths, "-o", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=120)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.parametrize("name,kind", [("http_load_cpu_c8.json", "http_load"), ("structured_cpu.json", "structured"),
                                       ("soak_cpu.json", "soak"), ("spec_cpu.json", "spec"),
                                       ("http_compare_cpu.json", "http_compare"),
                                       ("offline_throughput_cpu_native.json", "offline_throughput")])
def test_plot_recognises_each_results_kind(name, kind):
    sys.path.insert(0, str(REPO / "loadtest"))
    try:
        from plot import kind_of
    finally:
        sys.path.pop(0)
    assert kind_of(json.loads((REPO / "loadtest" / "results" / name).read_text())) == kind
