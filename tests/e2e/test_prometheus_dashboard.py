"""The Grafana dashboard against a real Prometheus scraping the real server.

Prometheus (Debian's package; `.ci/run` installs it when it runs as root) is
started with configs/prometheus/prometheus.yml, its target rewritten to the
test server. After one scrape we send a short load (streams, a repeated long
prompt that hits the prefix cache, a constrained request, an abort), wait for
two more scrapes, then evaluate every PromQL expression of
configs/grafana/dashboards/strix.json through Prometheus' HTTP API.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.e2e.helpers import DEFAULT_MODEL, REPO, free_port

DASHBOARD = REPO / "configs" / "grafana" / "dashboards" / "strix.json"
PROM_CONFIG = REPO / "configs" / "prometheus" / "prometheus.yml"
COMPOSE = REPO / "docker-compose.yml"
GRAFANA_VARS = {"$model_name": DEFAULT_MODEL, "$job": "strix", "$__rate_interval": "1m"}
# Expressions over counters the load below drives must be > 0, not only present.
DRIVEN = ("generation_tokens_total", "prompt_tokens_total", "request_success_total",
          "prefix_cache_hits_total", "request_aborted_total", "structured_requests_total",
          "process_cpu_seconds_total", "time_to_first_token_seconds", "step_duration_seconds",
          "batch_size", "e2e_request_latency_seconds", "process_resident_memory_bytes")
METRIC_NAME = re.compile(r"\b((?:strix:|process_)[a-zA-Z0-9_:]+)")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    data = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in data["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (.ci/run installs Debian's package as root)")
        pytest.skip("prometheus binary not installed")
    return found


class Prometheus:
    def __init__(self, target: str):
        config = yaml.safe_load(PROM_CONFIG.read_text())
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        self.dir = Path(tempfile.mkdtemp(prefix="strix-prom-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "log.txt", "wb")
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: httpx.get(self.url + "/-/ready", timeout=2).status_code == 200, 60)

    def wait(self, cond: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "log.txt").read_text()[-3000:]
            try:
                if cond():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out; log: {(self.dir / 'log.txt').read_text()[-3000:]}")

    def query(self, expr: str) -> list[dict]:
        resp = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def num_scrapes(self) -> int:
        result = self.query('count_over_time(up{job="strix"}[10m])')
        return int(float(result[0]["value"][1])) if result else 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def send_load(base: str) -> None:
    """Streams, a prefix-cache hit, a constrained request, an abort."""
    aborted_before = aborted_total(base)
    long_prompt = "You are a helpful assistant who answers briefly. " * 8
    for _ in range(2):  # the second finds the first's full blocks cached
        resp = httpx.post(base + "/v1/completions", json={
            "prompt": long_prompt + "Say hi.", "max_tokens": 4}, timeout=120)
        assert resp.status_code == 200, resp.text
    for i in range(3):
        with httpx.stream("POST", base + "/v1/completions", timeout=120, json={
                "prompt": f"Count to {i + 3}:", "max_tokens": 6, "stream": True}) as r:
            assert r.status_code == 200
            assert any(line == "data: [DONE]" for line in r.iter_lines())
    resp = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "A JSON object, please."}], "max_tokens": 8,
        "response_format": {"type": "json_object"}})
    assert resp.status_code == 200, resp.text
    with httpx.stream("POST", base + "/v1/completions", timeout=120, json={
            "prompt": "Write a long essay.", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)  # then disconnect: the server aborts the request
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the abort is counted once the engine notices
        if aborted_total(base) > aborted_before:
            return
        time.sleep(0.2)
    raise AssertionError("abort not counted")


def aborted_total(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    found = re.search(r"^strix:request_aborted_total\{[^}]*\} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def scraped(real_server) -> Iterator[Prometheus]:
    prom = Prometheus(f"127.0.0.1:{real_server.port}")
    try:
        prom.wait(lambda: prom.num_scrapes() >= 1, 60)
        send_load(real_server.base_url)
        after_load = prom.num_scrapes()
        prom.wait(lambda: prom.num_scrapes() >= after_load + 2, 60)
        yield prom
    finally:
        prom.stop()


def test_every_dashboard_expression_returns_data(scraped):
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    empty, zero = [], []
    for title, expr in exprs:
        result = scraped.query(substitute(expr))
        if not result:
            empty.append((title, expr))
            continue
        values = [float(r["value"][1]) for r in result]
        if any(name in expr for name in DRIVEN) and not any(v > 0 for v in values):
            zero.append((title, expr, values))
    assert not empty, f"expressions with no series: {empty}"
    assert not zero, f"driven counters that stayed 0: {zero}"


def test_dashboard_variables_resolve(scraped):
    for label, metric, expected in (("model_name", "strix:num_requests_running", DEFAULT_MODEL),
                                    ("job", "process_cpu_seconds_total", "strix")):
        resp = httpx.get(scraped.url + f"/api/v1/label/{label}/values",
                         params={"match[]": metric}, timeout=10)
        assert expected in resp.json()["data"], (label, resp.json())


def test_dashboard_and_compose_reference_only_exported_metrics(real_server):
    text = httpx.get(real_server.base_url + "/metrics", timeout=10).text
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M))
    data = json.loads(DASHBOARD.read_text())
    referenced = {m for _, e in dashboard_exprs() for m in METRIC_NAME.findall(e)}
    for var in data["templating"]["list"]:
        referenced.update(METRIC_NAME.findall(var["definition"]))
    assert referenced and not referenced - exported, sorted(referenced - exported)

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"strix", "prometheus", "grafana"} <= set(services)
    assert "/health" in " ".join(services["strix"]["healthcheck"]["test"])
    for service in services.values():
        for volume in service.get("volumes", []):
            assert (REPO / volume.split(":")[0]).exists(), volume
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    job = prom["scrape_configs"][0]
    assert job["static_configs"][0]["targets"] == ["strix:8000"]
    assert prom["global"]["scrape_interval"] == "5s" and job["metrics_path"] == "/metrics"
