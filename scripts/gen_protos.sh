#!/usr/bin/env bash
# Regenerates the committed Python stubs in protos/ from the .proto files (needs grpcio-tools).
# The stubs are committed so that a fresh clone runs without this step; tests/test_protos.py
# fails when they are out of date.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/videollm/v1/*.proto
