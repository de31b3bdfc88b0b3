"""Prometheus metrics, fed only by the engine's per-step `StepStats`.

`on_step` runs on the engine thread; prometheus-client metrics are
thread-safe. Each app owns its registry, so several apps (tests) can coexist.
At scrape time the KV-usage gauge is refreshed from the engine, and the
running/waiting gauges are zeroed when the engine holds no request (an idle
engine takes no steps, so no stats would report the last abort).
"""
from __future__ import annotations

from typing import Any

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from engine.structured.params import KINDS

PREFIX = "strix:"
# Sequences end in one of these (aborts are counted by request_aborted). Labelled
# series are created at start-up: Prometheus' rate() cannot see a series' first
# increment, so a series born at 1 would read as 0 on the dashboard.
FINISH_REASONS = ("stop", "length", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5, 5.0, 10.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
REQUEST_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                        20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


def length_buckets(max_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_len."""
    buckets: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            value = m * scale
            if value > max_len:
                return buckets
            buckets.append(float(value))
        scale *= 10


class ServerMetrics:
    def __init__(self, model_name: str, max_model_len: int,
                 registry: CollectorRegistry | None = None, num_spec_positions: int = 0):
        self.registry = registry or CollectorRegistry()
        if registry is None:  # process_cpu_seconds_total, process_resident_memory_bytes, ...
            ProcessCollector(registry=self.registry)
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Any:
            return Gauge(PREFIX + name, doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: Any) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets,
                             registry=reg).labels(model_name)

        self.model_name = model_name
        self.running = gauge("num_requests_running", "Requests being computed by the engine.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (prefill).")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Requests preempted (recompute).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in "
                                      "the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.aborted = counter("request_aborted", "Requests aborted (client gone, shutdown).")
        self._success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.",
                             REQUEST_TIME_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time waiting before first "
                               "scheduled.", REQUEST_TIME_BUCKETS)
        self._structured = Counter(PREFIX + "structured_requests", "Constrained requests, by kind "
                                   "(json, json_object, regex, choice, grammar).",
                                   ["model_name", "kind"], registry=reg)
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        for kind in KINDS:
            self._structured.labels(model_name, kind)
        self.compile_time = histogram("grammar_compile_seconds", "Grammar compile time "
                                      "(cache misses).", COMPILE_BUCKETS)
        self.compile_errors = counter("grammar_compile_errors", "Grammars refused (unsupported, "
                                      "invalid or over the time limit).")
        self.fast_forward = counter("fast_forward_tokens", "Tokens appended without sampling "
                                    "(the only token a grammar allowed).")
        self.step_time = histogram("step_duration_seconds", "Engine step wall time (schedule, "
                                   "forward, sample, detokenize).", STEP_BUCKETS)
        self.batch_size = histogram("batch_size", "Sequences computed per engine step.",
                                    BATCH_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Per request: (last token - "
                              "first token) / (output tokens - 1).", TPOT_BUCKETS)
        self.spec_drafts = counter("spec_decode_num_drafts", "Requests verified with drafts.")
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._spec_per_pos = Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted, by draft position (0 = first).",
                                     ["model_name", "position"], registry=reg)
        for pos in range(num_spec_positions):
            self._spec_per_pos.labels(model_name, str(pos))
        self.spec_draft_len = histogram("spec_decode_draft_length", "Draft tokens per verified "
                                        "request per step (the controller's k).",
                                        [float(k) for k in range(1, 17)] + [24.0, 32.0, 64.0])
        self.shared_prefix_groups = gauge("shared_prefix_groups", "Shared-prefix levels whose "
                                          "attention was decomposed in the last step.")
        self.shared_prefix_tokens = counter("shared_prefix_tokens", "Member x prefix tokens "
                                            "attended through a shared KV read (read once per group).")
        lb = length_buckets(max(max_model_len, 1))
        self.prompt_len = histogram("request_prompt_tokens", "Prompt length per request.", lb)
        self.generation_len = histogram("request_generation_tokens", "Generated tokens per "
                                        "request.", lb)

    def on_step(self, stats: Any) -> None:
        """Engine-thread callback: one `engine.outputs.StepStats` per step."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self._inc(self.prompt_tokens, stats.num_prompt_tokens)
        self._inc(self.generation_tokens, stats.num_generation_tokens)
        self._inc(self.preemptions, stats.num_preemptions)
        self._inc(self.prefix_queries, stats.prefix_cache_queries)
        self._inc(self.prefix_hits, stats.prefix_cache_hits)
        self._inc(self.aborted, stats.num_aborted)
        for value in stats.time_to_first_tokens:
            self.ttft.observe(value)
        for value in stats.inter_token_latencies:
            self.itl.observe(value)
        for kind in stats.structured_requests:
            self._structured.labels(self.model_name, kind).inc()
        self._inc(self.fast_forward, stats.num_fast_forward_tokens)
        if stats.batch_size:
            self.shared_prefix_groups.set(stats.shared_prefix_groups)
            self._inc(self.shared_prefix_tokens, stats.shared_prefix_tokens)
            self.step_time.observe(stats.step_duration)
            self.batch_size.observe(stats.batch_size)
        if stats.spec is not None and stats.spec.num_drafts:
            self._on_spec(stats.spec)
        for fin in stats.finished:
            self._success.labels(self.model_name, fin.finish_reason).inc()
            self.e2e.observe(fin.e2e_latency)
            self.queue.observe(fin.queue_time)
            self.prompt_len.observe(fin.num_prompt_tokens)
            self.generation_len.observe(fin.num_generation_tokens)
            if fin.time_per_output_token is not None:
                self.tpot.observe(fin.time_per_output_token)

    def _on_spec(self, spec: Any) -> None:
        self._inc(self.spec_drafts, spec.num_drafts)
        self._inc(self.spec_draft_tokens, spec.num_draft_tokens)
        self._inc(self.spec_accepted, spec.num_accepted_tokens)
        for pos, count in enumerate(spec.accepted_per_position):
            if count:
                self._spec_per_pos.labels(self.model_name, str(pos)).inc(count)
        for k in spec.draft_lengths:
            self.spec_draft_len.observe(k)

    @staticmethod
    def _inc(counter: Any, amount: int) -> None:
        if amount:
            counter.inc(amount)

    def refresh(self, engine: Any) -> None:
        """Scrape-time update of the state gauges from cheap engine reads."""
        try:
            self.kv_usage.set(engine.get_kv_cache_usage())
            if engine.num_unfinished_requests() == 0:
                self.running.set(0)
                self.waiting.set(0)
        except Exception:  # a dead engine must not break /metrics
            pass
        stats = getattr(engine, "grammar_stats", None)
        if stats is not None:  # compiles happen off the step, so they are read here
            durations, errors = stats()
            for value in durations:
                self.compile_time.observe(value)
            self._inc(self.compile_errors, errors)

    def render(self) -> bytes:
        return generate_latest(self.registry)
