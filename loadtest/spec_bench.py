"""Speculative decoding benchmark: tokens/s by batch size, no speculation vs fixed k vs adaptive.

Workloads (loadtest/workloads/*.jsonl): grounded (summarise / edit / extract over
stdlib source and docs) and open chat. For each workload, batch size B and
configuration, B requests run concurrently (`max_num_seqs=B`) over
`prompts_for(B)` prompts, greedy, `--max-tokens` each, EOS allowed; tokens/s =
completion tokens / time. Offline, all configurations of one (workload, B) run as
fresh engines on the same weights in one process, stepped in token lockstep
(loadtest/lockstep.py: the engine with the fewest committed tokens steps next, so a
drift of the VM's speed falls on every configuration alike), `--repeats` rounds; the
summary's ratios are geometric means of each round's ratios (paired within the round),
so the baseline is measured in the same minutes; the outputs are compared with the
no-speculation run token for token (greedy
speculation is lossless). `--server` also measures through HTTP
(`python -m server`, chat completions, B concurrent clients) for no speculation
and adaptive: both servers up at once, `--server-repeats` rounds of back-to-back runs.

    python loadtest/spec_bench.py --json loadtest/results/spec_cpu.json \
        --plot loadtest/results/spec_cpu.png --server
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Config:
    label: str
    method: str | None = None
    k: int = 0
    adaptive: bool = False
    draft_model: str | None = None  # method "draft"
    draft_quant: str | None = None  # method "draft": the draft's activation quant
    draft_kv: str | None = None  # method "draft": auto | own | shared (None: the engine's default, auto)

    def engine_args(self) -> dict:
        if self.method is None:
            return {}
        out = {"speculative_method": self.method, "num_speculative_tokens": self.k,
               "speculative_adaptive": self.adaptive}
        if self.draft_model:
            out["speculative_model"] = self.draft_model
        if self.draft_quant:
            out["speculative_draft_activation_quant"] = self.draft_quant
        if self.draft_kv:
            out["speculative_draft_kv"] = self.draft_kv
        return out

    def server_args(self) -> list[str]:
        if self.method is None:
            return []
        out = ["--speculative-method", self.method, "--num-speculative-tokens", str(self.k)]
        out += ["--speculative-model", self.draft_model] if self.draft_model else []
        out += ["--speculative-draft-activation-quant", self.draft_quant] if self.draft_quant else []
        out += ["--speculative-draft-kv", self.draft_kv] if self.draft_kv else []
        return out + ([] if self.adaptive else ["--no-speculative-adaptive"])


def configs(method: str, fixed: list[int], max_k: int,
            draft: tuple[str | None, str | None, str | None] = (None, None, None)) -> list[Config]:
    return [Config("no spec"), *(Config(f"{method} k={k}", method, k, False, *draft) for k in fixed),
            Config(f"{method} adaptive", method, max_k, True, *draft)]


def load_workload(name: str) -> list[list[dict]]:
    with open(HERE / "workloads" / f"{name}.jsonl") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def prompts_for(batch: int) -> int:
    # B = 4 runs 4 waves: 2 waves of 4 requests (512 tokens) left one round's noise (~10%)
    # larger than the differences between configurations. B = 1 runs 8 prompts: with 4, open
    # chat held 8 acceptable `ngram` drafts in 256 tokens, and one fixed k's few lucky steps
    # decided the cell.
    return {1: 8, 4: 16}.get(batch, 2 * batch if batch < 64 else batch)


def server_prompts_for(batch: int) -> int:
    # Through the server a wave's rate moves by ~5% (one sd) between waves seconds apart,
    # whatever the server (4 identical servers, 8 alternating waves each at open chat B = 16:
    # waves 0.90-1.10x of their mean, the processes' means within 2%), so every B > 1 runs 4
    # waves a round (B = 16 by default). B = 1 runs 4 prompts (its effects are large).
    return 4 if batch == 1 else 4 * batch


def _build(loaded, cfg: Config, batch: int, args, warmup: list[str], drafts: dict | None = None):
    """A fresh engine of `cfg`, warmed up. `drafts` (batch size -> the draft model an engine
    of that batch loads, filled here): the draft loads once per batch size, not once per
    engine (~8 s a load; 4 draft engines a round)."""
    from engine import LLM, SamplingParams
    from engine.config import EngineArgs
    from engine.setup import load_draft_model
    kwargs = dict(max_num_seqs=batch, kv_cache_memory=args.kv_cache_mib << 20, **cfg.engine_args())
    draft = None
    if cfg.draft_model and drafts is not None:
        if batch not in drafts:
            drafts[batch] = load_draft_model(EngineArgs(**kwargs), loaded)
        draft = drafts[batch]
    llm = LLM(loaded=loaded, draft_loaded=draft, **kwargs)
    llm.generate(["Warm up: say hi."] + list(warmup), SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    return llm


def run_offline_round(loaded, cfgs: list[Config], prompts: list[str], batch: int, args,
                      warmup: list[str], drafts: dict | None = None) -> dict[str, dict]:
    """One round: a fresh engine per configuration, all stepped in token lockstep
    (loadtest/lockstep.py), so each configuration's rate is measured over the same minutes."""
    from engine import SamplingParams
    from lockstep import run_lockstep
    engines = {cfg.label: _build(loaded, cfg, batch, args, warmup, drafts) for cfg in cfgs}
    before = {label: _spec_totals(llm) for label, llm in engines.items()}
    lanes = run_lockstep(engines, prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    out = {}
    for lane in lanes:
        after = _spec_totals(lane.llm)
        verifications, drafted, accepted = (a - b for a, b in zip(after, before[lane.label]))
        out[lane.label] = {"tokens_per_s": lane.rate(), "tokens": lane.tokens, "seconds": lane.seconds,
                           "steps": lane.steps, "decode_tokens_per_s": lane.decode_rate(),
                           "cost_model": _cost_model(lane.llm), "verifications": verifications,
                           "draft_tokens": drafted, "accepted_tokens": accepted,
                           "acceptance": accepted / drafted if drafted else None,
                           "mean_k": drafted / max(verifications, 1), "_outputs": lane.outputs}
    del engines, lanes
    gc.collect()
    return out


def run_offline_group(loaded, cfgs: list[Config], prompts: list[str], batch: int, args,
                      warmup: list[str], name: str, t_start: float, drafts: dict | None = None) -> list[dict]:
    """`--repeats` lockstep rounds; each row keeps every round's rate (the summary compares
    configurations round by round) and reports their geometric mean."""
    runs: dict[str, list[dict]] = {cfg.label: [] for cfg in cfgs}
    for rnd in range(args.repeats):
        for label, r in run_offline_round(loaded, cfgs, prompts, batch, args, warmup, drafts).items():
            runs[label].append(r)
            acc = "" if r["acceptance"] is None else f"  accept {r['acceptance']:.2f}  mean k {r['mean_k']:.2f}"
            print(f"offline {name:9s} B={batch:2d} {label:15s} {r['tokens_per_s']:7.1f} tok/s"
                  f" (decode phase {r['decode_tokens_per_s'] or 0:7.1f}){acc}"
                  f"  [round {rnd + 1}, {time.perf_counter() - t_start:.0f} s]", flush=True)
    ref = runs[cfgs[0].label][0]["_outputs"]
    rows = []
    for cfg in cfgs:
        rounds = runs[cfg.label]
        row = {k: v for k, v in rounds[-1].items() if k not in ("_outputs", "tokens_per_s", "decode_tokens_per_s")}
        row.update(mode="offline", workload=name, batch=batch, config=cfg.label, prompts=len(prompts),
                   rounds_tok_s=[r["tokens_per_s"] for r in rounds],
                   rounds_decode_tok_s=[r["decode_tokens_per_s"] for r in rounds],
                   rounds_draft_tokens=[r["draft_tokens"] for r in rounds],
                   tokens_per_s=_gmean([r["tokens_per_s"] for r in rounds]),
                   decode_tokens_per_s=_gmean([r["decode_tokens_per_s"] for r in rounds]),
                   mismatched_outputs=max(mismatches(ref, r["_outputs"]) for r in rounds))
        rows.append(row)
        print(f"  {len(rounds)} rounds: {cfg.label:15s} {row['tokens_per_s']:7.1f} tok/s"
              f"  diff outputs {row['mismatched_outputs']}", flush=True)
    return rows


def _gmean(values: list[float | None]) -> float | None:
    if not values or any(not v for v in values):
        return None
    return math.exp(sum(map(math.log, values)) / len(values))


def _spec_totals(llm) -> tuple[int, int, int]:
    spec = llm.core.spec
    if spec is None:
        return 0, 0, 0
    t = spec.totals
    return t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens


def _cost_model(llm) -> dict | None:
    """The adaptive controller's cost model at the end of the run (start-up probes refined online)."""
    spec = llm.core.spec
    if spec is None or not spec.controller.adaptive:
        return None
    from engine.spec.latency import describe
    ctl = spec.controller
    return {"step": describe(ctl.latency),
            "draft_pass": describe(ctl.draft_latency) if ctl.draft_latency is not None else None,
            "draft_catchup_ms_per_token": (1e3 * ctl.catchup_per_token if ctl.catchup_per_token is not None
                                           else None)}


def mismatches(ref: list[list[int]], got: list[list[int]]) -> int:
    return sum(a != b for a, b in zip(ref, got))


async def _http_batch(url: str, model: str, chats: list[list[dict]], batch: int, max_tokens: int,
                      warm: bool = True, salt: str | None = None) -> tuple[int, float, list[float]]:
    """B clients run `chats`; (completion tokens, seconds, each request's seconds). `salt`:
    every request's `cache_salt`, so a round shares no prefix cache with the rounds before it."""
    import httpx
    queue = list(chats)
    total = 0
    latencies: list[float] = []

    async def client(http):
        nonlocal total
        while queue:
            messages = queue.pop(0)
            sent = time.perf_counter()
            r = await http.post("/v1/chat/completions", json={
                "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                **({"cache_salt": salt} if salt else {})})
            r.raise_for_status()
            total += r.json()["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - sent)

    async with httpx.AsyncClient(base_url=url, timeout=1800) as http:
        if warm:
            await client_once(http, model)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(batch)))
        return total, time.perf_counter() - t0, latencies


async def client_once(http, model: str) -> None:
    r = await http.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    r.raise_for_status()


def run_servers(cfgs: list[Config], workloads: dict, batches: list[int], args) -> list[dict]:
    """One server per configuration, all up at once; `--server-repeats` rounds, each on servers
    started afresh (in the configurations' order in even rounds, reversed in odd ones): one
    server process can run a few percent off an identical one for its whole life, so rounds on
    the same servers repeat it (4 identical servers' means over 8 waves each sat within 2% at
    e55c85a, their waves within 10%: `server_prompts_for`). `layerskip` adaptive, drafting
    nothing, against no speculation at open chat B = 16, 4 rounds: 0.90x, 0.93x, 0.94x, 0.97x
    on one pair of servers; 0.98x, 1.08x, 1.10x, 1.01x on a fresh pair each round (two
    identical servers without speculation on one pair: 0.90x, 1.05x, 1.06x, 1.02x). A round
    runs each (workload, B) wave by wave (B prompts at a time, B clients), every wave on every
    server back to back, the order alternating by wave and round: each server's rate for the
    round is its tokens over its waves' time, and runs a few seconds apart share the VM's drift
    (with whole runs back to back, one cell's paired ratio read 0.80x in one round and 0.99x in
    the next). Each round's requests carry their own `cache_salt` (a round on servers that
    served the same prompts before would skip their prefill). Rows keep every round's rate, its
    requests' mean latency (send to response) and what the servers drafted (/metrics)."""
    rates: dict[tuple[str, int, str], list[float]] = {}
    latency: dict[tuple[str, int, str], list[float]] = {}
    drafted: dict[tuple[str, int, str], list[list[float]]] = {}
    for rnd in range(args.server_repeats):
        servers: dict = {}
        try:
            _start_servers(servers, cfgs if rnd % 2 == 0 else cfgs[::-1], batches, args)
            for key, rate, spec, mean_latency in _server_round(servers, cfgs, workloads, batches, args, rnd):
                rates.setdefault(key, []).append(rate)
                latency.setdefault(key, []).append(mean_latency)
                drafted.setdefault(key, []).append(spec)
        finally:
            for server in servers.values():
                server.stop()
    return [{"mode": "server", "workload": name, "batch": batch, "config": label,
             "rounds_tok_s": r, "tokens_per_s": _gmean(r), "rounds_latency_s": latency[(name, batch, label)],
             "rounds_draft_tokens": [d[0] for d in drafted[(name, batch, label)]],
             "rounds_accepted_tokens": [d[1] for d in drafted[(name, batch, label)]]}
            for (name, batch, label), r in rates.items()]


def _start_servers(servers: dict, cfgs: list[Config], batches: list[int], args) -> None:
    """Start a server per configuration in `cfgs` order into `servers` (label -> Server; the
    caller stops them, those started before a failure too). The fp32 path runs our attention
    over the dequantized linears, as the offline phase does (an LLM built on a loaded model
    keeps `attention_backend` auto: ours on the CPU)."""
    from local_server import Server
    native = ["--cpu-native-kernels"] if args.native else ["--no-cpu-native-kernels", "--attention-backend", "cpu"]
    for cfg in cfgs:
        servers[cfg.label] = Server("smollm2-135m", ["--kv-cache-memory", f"{args.kv_cache_mib}MiB", *native,
                                                     "--max-num-seqs", str(max(batches)), *cfg.server_args()],
                                    600)


def _server_round(servers: dict, cfgs: list[Config], workloads: dict, batches: list[int], args,
                  rnd: int) -> list[tuple[tuple[str, int, str], float, list[float], float]]:
    """Round `rnd` on `servers`, every (workload, B) wave by wave: ((workload, B, label),
    tokens/s, [drafted, accepted tokens], mean request seconds) of each cell and server."""
    out = []
    for name, chats in workloads.items():
        for batch in batches:
            prompts = chats[:server_prompts_for(batch)]
            totals = {cfg.label: [0, 0.0, []] for cfg in cfgs}  # tokens, seconds, request seconds
            before = {label: _server_spec(s.url) for label, s in servers.items()}
            for w, start in enumerate(range(0, len(prompts), batch)):
                for cfg in (cfgs if (rnd + w) % 2 == 0 else cfgs[::-1]):
                    # One untimed 4-token warm-up per server and cell (its drafts count in /metrics).
                    n, secs, each = asyncio.run(_http_batch(servers[cfg.label].url, "smollm2-135m",
                                                            prompts[start:start + batch], batch, args.max_tokens,
                                                            warm=w == 0, salt=f"round-{rnd}"))
                    totals[cfg.label][0] += n
                    totals[cfg.label][1] += secs
                    totals[cfg.label][2] += each
            for label, (n, secs, each) in totals.items():
                spec = [a - b for a, b in zip(_server_spec(servers[label].url), before[label])]
                mean_latency = sum(each) / len(each)
                out.append(((name, batch, label), n / secs, spec, mean_latency))
                print(f"  server {name:9s} B={batch:2d} {label:15s} {n / secs:7.1f} tok/s"
                      f"  mean latency {mean_latency:6.2f} s  drafted {spec[0]:.0f} accepted {spec[1]:.0f}"
                      f"  [round {rnd + 1}]", flush=True)
    return out


def _server_spec(url: str) -> list[float]:
    """The server's draft and accepted token counters (/metrics; 0 without speculation)."""
    import httpx
    from soak import scrape

    async def read() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=url) as http:
            return await scrape(http)
    values = asyncio.run(read())
    return [values.get(name, 0.0) for name in ("strix:spec_decode_num_draft_tokens_total",
                                               "strix:spec_decode_num_accepted_tokens_total")]


def summarise(rows: list[dict]) -> list[dict]:
    """Per (mode, workload, batch): adaptive vs no spec and vs the best fixed configuration.
    Offline rows carry one rate per lockstep round; a ratio is the geometric mean of the
    rounds' ratios, and "best" is the configuration with the highest such ratio to no spec."""
    out = []
    keys = sorted({(r["mode"], r["workload"], r["batch"]) for r in rows})
    for mode, wl, b in keys:
        members = {r["config"]: r for r in rows if (r["mode"], r["workload"], r["batch"]) == (mode, wl, b)}
        ad_label = next((k for k in members if k.endswith("adaptive")), None)
        if ad_label is None or "no spec" not in members:
            continue
        entry = {"mode": mode, "workload": wl, "batch": b, "adaptive_tok_s": members[ad_label]["tokens_per_s"],
                 "no_spec_tok_s": members["no spec"]["tokens_per_s"]}
        for prefix, key in (("", "rounds_tok_s"), ("decode_", "rounds_decode_tok_s")):
            rounds = {k: r.get(key) for k, r in members.items()}  # server rows: no decode phase
            if not all(v and all(v) for v in rounds.values()):
                continue
            others = [k for k in members if k != ad_label]
            best = max(others, key=lambda k: _paired(rounds[k], rounds["no spec"]))
            entry.update({f"{prefix}speedup_vs_no_spec": _paired(rounds[ad_label], rounds["no spec"]),
                          f"{prefix}best_other": best,
                          f"{prefix}ratio_vs_best_other": _paired(rounds[ad_label], rounds[best])})
        if all(r.get("rounds_latency_s") for r in members.values()):  # server rows: < 1 is faster
            entry["latency_vs_no_spec"] = _paired(members[ad_label]["rounds_latency_s"],
                                                  members["no spec"]["rounds_latency_s"])
        out.append(entry)
    return out


def _paired(a: list[float], b: list[float]) -> float:
    """Geometric mean over rounds of a[r] / b[r]."""
    return _gmean([x / y for x, y in zip(a, b)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="grounded,open_chat")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--fixed-k", default="2,4,8")
    ap.add_argument("--max-k", type=int, default=8, help="adaptive: most drafts per request")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-mib", type=int, default=2048)
    ap.add_argument("--warmup-prompts", type=int, default=0,
                    help="run this many held-out prompts of the workload (its last ones) before timing")
    ap.add_argument("--repeats", type=int, default=2, help="offline lockstep rounds (ratios paired within a round)")
    ap.add_argument("--server", action="store_true", help="also measure through HTTP")
    ap.add_argument("--server-batches", default="1,16")
    # 3 rounds of 4 waves at B > 1 (12 a server; was 4 rounds of 2): the noise is the
    # waves' (server_prompts_for), so more waves, not more fresh servers, narrow it.
    ap.add_argument("--server-repeats", type=int, default=3,
                    help="server rounds (every server up at once; ratios paired within a round)")
    ap.add_argument("--draft-model", help="method draft: the draft model (e.g. smollm2-135m, the target's own GGUF)")
    ap.add_argument("--draft-kv", choices=("auto", "own", "shared"),
                    help="method draft: where the draft's KV lives (unset: the engine's auto, shared for the "
                         "target's own checkpoint)")
    ap.add_argument("--draft-activation-quant", choices=("none", "q8"),
                    help="method draft: the draft's activation quant on the native kernels (q8: a cheap close draft)")
    ap.add_argument("--native", action="store_true",
                    help="linears on our GGUF block kernels (default: the dequantized fp32 path)")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    from engine.setup import load_model
    from engine.config import EngineArgs

    loaded = load_model(EngineArgs(cpu_native_kernels=args.native))
    tok = loaded.tokenizer
    workloads = {name: load_workload(name) for name in args.workloads.split(",")}
    batches = [int(b) for b in args.batches.split(",") if b]  # "": the server phase only
    cfgs = configs(args.method, [int(k) for k in args.fixed_k.split(",")], args.max_k,
                   (args.draft_model, args.draft_activation_quant, args.draft_kv))
    rows: list[dict] = []
    drafts: dict = {}  # batch size -> the draft model (method draft)
    t_start = time.perf_counter()
    if args.server:  # first: a server that fails to start fails the run in minutes, not at its end
        server_batches = [int(b) for b in args.server_batches.split(",")]
        rows += run_servers([cfgs[0], cfgs[-1]], workloads, server_batches, args)
    for name, chats in workloads.items():
        texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
        for batch in batches:
            prompts = texts[:prompts_for(batch)]
            # Held-out prompts of the same workload, run before timing: a drafter that learns
            # across requests (recycling) starts warm, as in a server that has run a while.
            # (fewer where the workload has no prompts left over, e.g. open chat at B = 64).
            warmup = texts[max(len(texts) - args.warmup_prompts, len(prompts)):] if args.warmup_prompts else []
            assert not set(warmup) & set(prompts), "warm-up prompts must not be measured"
            rows += run_offline_group(loaded, cfgs, prompts, batch, args, warmup, name, t_start, drafts)
            write_result(args, rows, t_start)  # every group: a run cut short keeps what it measured
    summary = write_result(args, rows, t_start)
    print("\nadaptive vs no spec and vs the best other configuration:")
    for s in summary:
        decode = (f"; decode phase {s['decode_speedup_vs_no_spec']:.2f}x no spec, "
                  f"{s['decode_ratio_vs_best_other']:.2f}x {s['decode_best_other']}"
                  if "decode_speedup_vs_no_spec" in s else "")
        decode += (f"; mean request latency {s['latency_vs_no_spec']:.2f}x no spec's"
                   if "latency_vs_no_spec" in s else "")
        print(f"  {s['mode']:7s} {s['workload']:9s} B={s['batch']:2d}: {s['adaptive_tok_s']:7.1f} tok/s = "
              f"{s['speedup_vs_no_spec']:.2f}x no spec, {s['ratio_vs_best_other']:.2f}x {s['best_other']}{decode}")
    if args.plot:
        from plot import plot_spec
        plot_spec({"rows": rows, "summary": summary}, args.plot)


def write_result(args, rows: list[dict], t_start: float) -> list[dict]:
    """The rows so far and their summary, written to --json (if given); returns the summary."""
    from engine.models.cpu_linear import packing_available

    summary = summarise(rows)
    result = {"command": " ".join(sys.argv), "device": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "attention": "ours (kernels/cpu) offline and through the server",
              "linear_path": ("native GGUF blocks (Q4_1 + Q8_0 head), our AVX2 kernels, fp32 activations"
                              if args.native else "fp32 dequantized GGUF, oneDNN packed" if packing_available()
                              else "fp32 dequantized GGUF, F.linear"),
              "draft": ({"model": args.draft_model, "activation_quant": args.draft_activation_quant,
                         "kv": args.draft_kv or "auto (shared for the target's own checkpoint)"}
                        if args.method == "draft" else None),
              "max_tokens": args.max_tokens, "elapsed_s": time.perf_counter() - t_start,
              "rows": rows, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return summary


if __name__ == "__main__":
    main()
