"""Harvest throughput vs the bare model forward, on the embedded SmolLM2 (layer 15 of 30).

Each phase runs in a fresh process (so peak RSS is its own) on the same batches:
  harvest    `run_harvest` end to end: hooks, early stop, copies, store writes
  truncated  the bare base model with its block list cut after the deepest layer (baseline a)
  full       the whole causal LM forward, logits included (baseline b)
Usage: python benchmarks/bench_harvest.py [--tokens 8192] [--context-length 512] [--layer 15]
                                          [--batch-tokens 8192] [--repeats 3]
With --repeats N the phases run N rounds (harvest, truncated, full, harvest, ...) and each phase
reports its fastest round (the least disturbed by other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _batches(args: argparse.Namespace):
    from bae.pipeline.harvest.config import HarvestConfig
    from bae.pipeline.harvest.corpus import load_corpus
    from bae.pipeline.harvest.plan import forward_batches, plan_units
    from bae.pipeline.harvest.windows import tokenize_corpus
    from bae.pipeline.llm.load import load_model

    cfg = HarvestConfig(
        context_length=args.context_length,
        max_tokens=args.tokens,
        layers=[args.layer],
        batch_tokens=args.batch_tokens,
    )
    loaded = load_model(None, "float32")
    docs = [d.text for d in load_corpus([]).docs]
    toks = tokenize_corpus(loaded.tokenizer, docs, cfg.context_length, max_tokens=cfg.token_budget)
    plan = plan_units(toks.windows, cfg.rows_per_unit)
    batches = []
    for unit in range(len(plan.units)):
        for batch in forward_batches(plan.unit_windows(unit), cfg.batch_tokens):
            batches.append(torch.stack([torch.from_numpy(w.input_ids).long() for w in batch]))
    return loaded, batches


def _time_forward(fn, batches) -> tuple[int, float]:
    with torch.inference_mode():
        fn(batches[0][:1, :64])  # warm-up
        t0 = time.perf_counter()
        for ids in batches:
            fn(ids)
        return sum(b.numel() for b in batches), time.perf_counter() - t0


def phase(args: argparse.Namespace) -> dict:
    forward = ""
    if args.phase == "harvest":
        from bae.pipeline.harvest.config import HarvestConfig
        from bae.pipeline.harvest.run import run_harvest

        with tempfile.TemporaryDirectory() as tmp:
            cfg = HarvestConfig(
                out=f"{tmp}/store",
                context_length=args.context_length,
                max_tokens=args.tokens,
                layers=[args.layer],
                batch_tokens=args.batch_tokens,
            )
            result = run_harvest(cfg, show_progress=False)
            tokens, seconds = result.tokens, result.seconds
            forward = result.summary.get("forward share", "")
    else:
        loaded, batches = _batches(args)
        model = loaded.model
        if args.phase == "truncated":
            model.model.layers = model.model.layers[: args.layer]
            model.config.num_hidden_layers = args.layer
            tokens, seconds = _time_forward(lambda ids: model.model(input_ids=ids, use_cache=False), batches)
        else:
            tokens, seconds = _time_forward(lambda ids: model(input_ids=ids, use_cache=False), batches)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"phase": args.phase, "tokens": tokens, "seconds": seconds, "peak_rss": peak, "forward": forward}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context-length", type=int, default=512)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="harvest --batch-tokens")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each phase keeps its fastest")
    parser.add_argument("--phase", choices=["harvest", "truncated", "full"])
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)), flush=True)
        return
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name in ("harvest", "truncated", "full"):
            cmd = [sys.executable, __file__, "--phase", name, "--tokens", str(args.tokens)]
            cmd += ["--context-length", str(args.context_length), "--layer", str(args.layer)]
            cmd += ["--batch-tokens", str(args.batch_tokens)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            if name not in results or result["seconds"] < results[name]["seconds"]:
                results[name] = result
    print(
        f"SmolLM2-135M (float32, CPU, {torch.get_num_threads()} threads), layer {args.layer}/30, "
        f"{args.tokens} tokens, context {args.context_length}, batch tokens {args.batch_tokens}, "
        f"fastest of {args.repeats}"
    )
    base = results["harvest"]["tokens"] / results["harvest"]["seconds"]
    for name, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(
            f"  {name:9s} {rate:8.0f} tok/s  harvest/this = {base / rate:5.2f}x  "
            f"peak RSS {r['peak_rss'] / 2**20:6.0f} MiB"
            + (f"  forward {r['forward']}" if r.get("forward") else "")
        )


if __name__ == "__main__":
    main()
