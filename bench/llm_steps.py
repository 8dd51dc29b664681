"""Time the LLM service's forward passes alone: one decode step per batch size and context
length, and prefills of several lengths (python -m bench.llm_steps --shape 7b --device cuda).

No gRPC, no gateway: this is the engine's floor. Prints a markdown table and the decode floor
from memory bandwidth (weights read once per step); --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.checkpoint import SHAPES, build_checkpoint
from bench.timing import median_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_steps", description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("bench_out/ckpt"))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--contexts", default="700,6300", help="tokens already in each sequence's cache")
    parser.add_argument("--prefills", default="20,640,6300", help="prompt lengths to prefill")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--max-context", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from llm_service.model import LanguageModel
    from llm_service.runner import ModelRunner
    from videollm.settings import LLMSettings

    model_dir = build_checkpoint(args.shape, args.checkpoint_dir, args.device)
    dtype = LLMSettings(model=model_dir, device=args.device).torch_dtype_name()
    lm = LanguageModel(model_dir, args.device, dtype)
    runner = ModelRunner(lm.model, args.slots, args.max_context)
    start = time.perf_counter()
    runner.capture_graphs()
    capture_s = time.perf_counter() - start
    device = runner.device
    rows = []
    for length in (int(x) for x in args.prefills.split(",")):
        embeds = torch.randn(length, lm.hidden_size, device=device, dtype=lm.dtype)  # [L, D]

        def prefill():
            runner.free(0)
            runner.prefill(0, embeds, 0)

        rows.append({"pass": "prefill", "batch": 1, "tokens": length, "ms": median_ms(prefill, args.repeats, device)})
    runner.free(0)
    for context in (int(x) for x in args.contexts.split(",")):
        for batch in (int(x) for x in args.batches.split(",")):
            embeds = torch.randn(context, lm.hidden_size, device=device, dtype=lm.dtype)
            for slot in range(batch):
                runner.prefill(slot, embeds, 0)
            tokens = [1] * batch

            def step():
                runner.decode(batch, tokens)
                for slot in range(batch):  # stay at the same context length
                    runner.filled[slot] -= 1
                runner.lengths[:, :batch] -= 1
                runner.positions[:batch] -= 1

            ms = median_ms(step, args.repeats, device)
            rows.append({"pass": "decode step", "batch": batch, "tokens": context, "ms": ms,
                         "ms_per_token": ms / batch})
            for slot in range(batch):
                runner.free(slot)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    print(f"{args.shape} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{len(runner.graphs)} decode graphs captured in {capture_s:.1f} s, weights {weight_bytes / 2**30:.1f} GiB")
    print("\n| pass | batch | tokens (prompt or context) | ms | ms per sequence |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pass']} | {row['batch']} | {row['tokens']} | {row['ms']:.2f} | {row['ms'] / row['batch']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "weight_bytes": weight_bytes}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
