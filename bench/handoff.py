"""Where the encoder-to-LLM hand-off of the visual tokens goes, part by part
(python -m bench.handoff --device cuda).

For token tensors of the 7B shape (width 3584, bf16) at the sizes that 32 frames give at retain
0.1, 0.25 and 1.0, it times:
  - serialise: the encoder's side, tensor -> bytes + CRC-32 header -> serialized chunk messages;
  - pull: one gRPC hop on loopback, a real encoder service's Pull into the LLM's assembler
    (transfer, parse, copy, length and CRC checks), as an LLM on another host does on a miss;
  - same host: the encoder writes the tokens to a file in shared memory, the LLM takes it (rename,
    map, delete) and checks its size, as an LLM on the same host does on a miss;
  - to device: the checked tensor copied to the GPU.
The relay through the gateway (the second hop it replaces) is measured end to end by
`videollm bench` (hand-off column). Prints a markdown table; no model weights are involved beyond
the tiny encoder that hosts the Pull service.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.timing import median_ms
from llm_service.pull import EncoderPuller
from protos.videollm.v1 import llm_pb2
from videollm import tensors, transport

SIZES = {"retain 0.1 (639 tokens)": 639, "retain 0.25 (1585 tokens)": 1585, "retain 1.0 (6273 tokens)": 6273}
WIDTH = 3584


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model-dir", type=Path, default=Path("bench_out/tiny"))
    args = parser.parse_args(argv)

    from encoder_service.engine import EncoderEngine
    from encoder_service.pull_store import PullStore
    from encoder_service.server import EncoderServicer
    from encoder_service.server import start as start_encoder
    from videollm.settings import EncoderSettings
    from videollm.tiny_model import build_tiny_model

    if not (args.model_dir / "config.json").is_file():
        build_tiny_model(args.model_dir)
    settings = EncoderSettings(model=args.model_dir, port=0, pull_shm_dir="")  # Pull over gRPC
    servicer = EncoderServicer(EncoderEngine(settings))
    server, _, port = start_encoder(settings, servicer=servicer)
    store = servicer.pulls
    puller = EncoderPuller(max_bytes=1 << 31, timeout_s=30)
    shm = Path(EncoderSettings.model_fields["pull_shm_dir"].default)  # same host: a file in shared memory
    shm_store, shm_puller = PullStore(1 << 31, 30.0, shm), EncoderPuller(max_bytes=1 << 31, timeout_s=30, shm_dir=shm)
    rows = []
    try:
        for name, tokens in SIZES.items():
            tensor = torch.randn(tokens, WIDTH).to(torch.bfloat16)  # [N, D] as the encoder returns it

            def serialise():
                payload = tensors.tensor_bytes(tensor)
                header = tensors.describe(tensor, payload)
                messages = list(transport.chunk_messages(payload, transport.ENCODE_CHUNK_FIELD))  # as the encoder writes them
                return header, payload, messages

            header, payload, _ = serialise()
            serialise_ms = median_ms(serialise, args.repeats)
            received = []

            def pull():
                ticket = store.put(payload)
                received.append(puller.pull(header, llm_pb2.VisualPull(address=f"127.0.0.1:{port}", ticket=ticket)))

            pull_ms = median_ms(pull, args.repeats)
            assert received[-1] is not None and torch.equal(received[-1], tensor)

            def same_host():
                ticket = shm_store.put(payload)  # the encoder writes the file
                received.append(shm_puller.pull(header, llm_pb2.VisualPull(address="unused:0", ticket=ticket)))

            shm_ms = median_ms(same_host, args.repeats)
            assert shm_puller.from_shared_memory == args.repeats + 1 and torch.equal(received[-1], tensor)
            shm_puller.from_shared_memory = 0
            device = torch.device(args.device)

            def to_device():
                received[-1].to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            copy_ms = median_ms(to_device, args.repeats)
            rows.append((name, len(payload) / 1e6, serialise_ms, pull_ms, shm_ms, copy_ms))
    finally:
        server.stop(None)
        shm_store.close()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"hand-off parts, 7B token width, bf16, device {gpu}, median of {args.repeats}\n")
    print("| tokens | MB | serialise ms | pull (1 gRPC hop, checked) ms | same host: file in shared memory "
          "(write, take, size checked) ms | copy to device ms |\n|---|---|---|---|---|---|")
    for name, mb, serialise_ms, pull_ms, shm_ms, copy_ms in rows:
        print(f"| {name} | {mb:.1f} | {serialise_ms:.2f} | {pull_ms:.2f} | {shm_ms:.2f} | {copy_ms:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
