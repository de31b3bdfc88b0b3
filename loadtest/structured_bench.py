"""Structured-output benchmark over the JSONSchemaBench dev schemas, through the server.

    python loadtest/structured_bench.py                       # starts the server itself
    python loadtest/structured_bench.py --per-split 25 --json loadtest/results/structured_cpu.json
    python loadtest/structured_bench.py --url http://127.0.0.1:8000 --schema-in-prompt

Per split (Github_easy, Github_trivial, Glaiveai2K, Snowplow; `--per-split`
schemas sampled with `--seed`, the full 4,497 would take hours on 2 cores):
  declared coverage   schemas the server accepts (not a 400)
  empirical coverage  outputs that finish with "stop" and validate (jsonschema, the
                      schema's own draft, formats checked) / schemas sampled
  compliance          valid / outputs that finished with "stop"
  compile p50 / p99   the backend's compile time per schema, cold cache, measured
                      in-process with the server's compiler code
Then TPOT (time per output token after the first, streamed) of the constrained
requests vs the same prompts unconstrained, at concurrency 1 (`--c1-requests`)
and 16 (every sampled schema), in the same run. Greedy, `max_tokens` 512
(`--max-tokens`), the schema not in the prompt unless `--schema-in-prompt`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import Record, check_loopback, one_request, percentile  # noqa: E402
from local_server import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".." / "shared" / "data" / "jsonschemabench-dev"
SPLITS = ("Github_easy", "Github_trivial", "Glaiveai2K", "Snowplow")
PUBLISHED = {"Glaiveai2K": 0.96, "Github_easy": 0.86, "Snowplow": 0.82}  # JSONSchemaBench, best
SYSTEM = "You answer with short, minimal JSON: few keys, brief values."


def prompt_for(schema: dict, with_schema: bool) -> str:
    user = "Reply with one short JSON object."
    if with_schema:
        user += " It must follow this JSON schema:\n" + json.dumps(schema)
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def sample(per_split: int, seed: int) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    out = []
    for split in SPLITS:
        files = sorted((BENCH / split).glob("*.json"))
        for path in rng.sample(files, min(per_split, len(files))):
            out.append((split, path.name, json.loads(path.read_text())))
    return out


def valid(schema: dict, text: str) -> bool:
    import jsonschema
    try:
        cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
        cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))
        return True
    except Exception:
        return False


def compile_times(schemas: list[tuple[str, str, dict]]) -> dict[str, list[float]]:
    """Cold-cache compile time per schema (the server's compiler, in-process)."""
    from engine.models.loader import load_tokenizer, resolve_model
    from engine.sampling_params import ParamError
    from engine.structured.compiler import GrammarCompiler
    from engine.structured.params import StructuredOutputsParams

    compiler = GrammarCompiler(load_tokenizer(resolve_model("smollm2-135m")), 49152, timeout_s=60)
    compiler.compile(StructuredOutputsParams(json={"type": "object"}))  # builds the tokenizer tables
    out: dict[str, list[float]] = {s: [] for s in SPLITS}
    for split, _, schema in schemas:
        t = time.perf_counter()
        try:
            compiler.compile(StructuredOutputsParams(json=schema))
        except ParamError:
            pass
        out[split].append(time.perf_counter() - t)
    compiler.shutdown()
    return out


def tpot(rec: Record) -> float | None:
    """Seconds per output token after the first, from one streamed request."""
    if rec.ttft is None or rec.e2e is None or rec.output_tokens < 2:
        return None
    return (rec.e2e - rec.ttft) / (rec.output_tokens - 1)


async def run(client: httpx.AsyncClient, bodies: list[dict], concurrency: int) -> tuple[list[Record], float]:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(body: dict) -> Record:
        async with sem:
            return await one_request(client, "/v1/completions", body)
    start = time.perf_counter()
    recs = await asyncio.gather(*(guarded(b) for b in bodies))
    return list(recs), time.perf_counter() - start


def body(schema: dict, args: argparse.Namespace, constrained: bool) -> dict:
    out = {"prompt": prompt_for(schema, args.schema_in_prompt), "max_tokens": args.max_tokens,
           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if constrained:
        out["structured_outputs"] = {"json": schema}
    return out


def tpot_summary(recs: list[Record]) -> dict:
    values = [t for t in map(tpot, recs) if t is not None]
    return {"n": len(values), "tpot_mean_ms": 1000 * sum(values) / len(values) if values else None,
            "tpot_p50_ms": 1000 * (percentile(values, 50) or 0), "tokens": sum(r.output_tokens for r in recs)}


def split_table(schemas, recs, times) -> dict:
    table = {}
    for split in SPLITS:
        rows = [(s, r) for (sp, _, s), r in zip(schemas, recs) if sp == split]
        declared = sum(r.status == 200 for _, r in rows)
        stopped = [(s, r) for s, r in rows if r.status == 200 and r.finish_reason == "stop"]
        good = sum(valid(s, r.text) for s, r in stopped)
        t = times[split]
        table[split] = {"sampled": len(rows), "declared_coverage": declared / max(len(rows), 1),
                        "empirical_coverage": good / max(len(rows), 1),
                        "compliance": good / len(stopped) if stopped else None,
                        "compile_p50_ms": 1000 * (percentile(t, 50) or 0),
                        "compile_p99_ms": 1000 * (percentile(t, 99) or 0),
                        "published_best": PUBLISHED.get(split)}
    return table


async def bench(args: argparse.Namespace, url: str) -> dict:
    schemas = sample(args.per_split, args.seed)
    times = compile_times(schemas)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "server_args"}}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0)) as client:
        recs, wall = await run(client, [body(s, args, True) for _, _, s in schemas], 16)
        result["splits"] = split_table(schemas, recs, times)
        plain, plain_wall = await run(client, [body(s, args, False) for _, _, s in schemas], 16)
        result["tpot_c16"] = {"constrained": {**tpot_summary(recs), "wall_s": wall},
                              "unconstrained": {**tpot_summary(plain), "wall_s": plain_wall}}
        few = schemas[:: max(1, len(schemas) // args.c1_requests)][:args.c1_requests]
        c1, _ = await run(client, [body(s, args, True) for _, _, s in few], 1)
        c1_plain, _ = await run(client, [body(s, args, False) for _, _, s in few], 1)
        result["tpot_c1"] = {"constrained": tpot_summary(c1), "unconstrained": tpot_summary(c1_plain)}
        metrics = (await client.get("/metrics")).text
    result["fast_forward_tokens"] = sum(float(line.split()[-1]) for line in metrics.splitlines()
                                        if line.startswith("strix:fast_forward_tokens_total"))
    for c in ("tpot_c1", "tpot_c16"):
        a, b = result[c]["constrained"]["tpot_mean_ms"], result[c]["unconstrained"]["tpot_mean_ms"]
        result[c]["ratio_constrained_over_unconstrained"] = a / b if a and b else None
    return result


def print_report(result: dict) -> None:
    print(f"{'split':16s} {'n':>4s} {'declared':>9s} {'empirical':>10s} {'compliance':>11s} "
          f"{'compile p50':>12s} {'p99':>8s} {'published':>10s}")
    for split, row in result["splits"].items():
        comp = "-" if row["compliance"] is None else f"{row['compliance']:.2f}"
        pub = "-" if row["published_best"] is None else f"{row['published_best']:.2f}"
        print(f"{split:16s} {row['sampled']:4d} {row['declared_coverage']:9.2f} "
              f"{row['empirical_coverage']:10.2f} {comp:>11s} {row['compile_p50_ms']:10.1f}ms "
              f"{row['compile_p99_ms']:6.1f}ms {pub:>10s}")
    for c in ("tpot_c1", "tpot_c16"):
        r = result[c]
        print(f"{c}: constrained {r['constrained']['tpot_mean_ms']:.1f} ms/token, unconstrained "
              f"{r['unconstrained']['tpot_mean_ms']:.1f} ms/token, ratio "
              f"{r['ratio_constrained_over_unconstrained']:.3f}")
    print(f"fast-forwarded tokens: {result['fast_forward_tokens']:.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server on loopback (default: start one)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--per-split", type=int, default=25)
    p.add_argument("--c1-requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schema-in-prompt", action="store_true")
    p.add_argument("--json", help="write the results here")
    args, extra = p.parse_known_args(argv)
    args.server_args = [a for a in extra if a != "--"]
    server = None
    if args.url:
        check_loopback(args.url)
        url = args.url
    else:
        server = Server(args.model, args.server_args, 600)
        url = server.url
    try:
        result = asyncio.run(bench(args, url))
    finally:
        if server is not None:
            server.stop()
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
