"""Evaluate throughput vs the bare full forward, on the embedded SmolLM2 (a BAE at layer 15 of 30).

One process, the same windows and batches for every phase:
  forward    the whole causal LM forward, logits included (the baseline)
  first      `run_evaluate` with a fresh output: the clean pass, the zero and mean ablations of the
             layer and the spliced checkpoint (blocks 15.. replayed three times)
  another    a second checkpoint into the same output: the ablations are reused, so the clean pass
             and one replay (what every further checkpoint costs)
The checkpoints are untrained BAEs (d' = 4 x 576): speed does not depend on the weights.
Usage: python benchmarks/bench_evaluate.py [--tokens 8192] [--context-length 512] [--layer 15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def setup(root: Path, layer: int, context_length: int) -> tuple[str, list[str]]:
    """A small store of the builtin corpus (for the layer mean) and two untrained BAEs trained 'on' it."""
    from bae.pipeline.harvest.config import HarvestConfig
    from bae.pipeline.harvest.run import run_harvest
    from bae.trainer import ModelConfig, build_autoencoder
    from bae.trainer.provenance import Provenance

    store = run_harvest(
        HarvestConfig(
            out=str(root / "store"), max_tokens=4096, layers=[layer], context_length=context_length
        ),
        show_progress=False,
    ).store
    provenance = Provenance(
        store=store.url,
        model=store.meta["model"],
        layer=layer,
        d_model=store.d_model,
        corpus_fingerprint=store.meta["corpus_fingerprint"],
    )
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_autoencoder(ModelConfig(d_model=store.d_model), provenance)
        paths.append(str(model.save_pretrained(root / f"bae-{seed}")))
    return store.url, paths


def bare_forward(cfg) -> float:
    """tok/s of the full causal LM forward over the windows and batches evaluate uses."""
    from bae.pipeline.evaluate.inputs import prepare
    from bae.pipeline.harvest.plan import forward_batches

    prepared = prepare(cfg, "cpu")
    model = prepared.loaded.model
    batches = [
        torch.stack([torch.from_numpy(w.input_ids).long() for w in batch])
        for unit in range(len(prepared.units))
        for batch in forward_batches(list(prepared.unit_windows(unit)), cfg.batch_tokens)
    ]
    with torch.inference_mode():
        model(input_ids=batches[0][:1, :64], use_cache=False)  # warm-up
        began = time.perf_counter()
        for ids in batches:
            model(input_ids=ids, use_cache=False)
        return sum(b.numel() for b in batches) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for flag, default in (("--tokens", 8192), ("--context-length", 512), ("--layer", 15)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    from bae.pipeline.evaluate.config import EvaluateConfig
    from bae.pipeline.evaluate.run import run_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store, checkpoints = setup(root, args.layer, args.context_length)
        common = {"store": store, "corpus": ["builtin"], "max_tokens": args.tokens, "bootstrap": 0}
        first = EvaluateConfig(checkpoints=checkpoints[:1], out=str(root / "out"), **common)
        base = bare_forward(first)
        rates = {
            "first": run_evaluate(first, show_progress=False, quiet=True).tokens_per_second,
            "another": run_evaluate(
                first.model_copy(update={"checkpoints": checkpoints}), show_progress=False, quiet=True
            ).tokens_per_second,
        }
    print(
        f"SmolLM2-135M (float32, CPU, {torch.get_num_threads()} threads), BAE at layer {args.layer}/30, "
        f"{args.tokens} tokens, context {args.context_length}"
    )
    print(f"  forward  {base:8.0f} tok/s")
    for name, rate in rates.items():
        print(f"  {name:8s} {rate:8.0f} tok/s  evaluate/forward = {rate / base:4.2f}x")


if __name__ == "__main__":
    main()
