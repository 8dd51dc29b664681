"""The committed Python stubs are what protoc makes of the .proto files (so a fresh clone works)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_proto_files(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.",
         *protos],
        cwd=tmp_path, check=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "protos").rglob("*_pb2*.py*"))
    assert generated, "protoc generated nothing"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stubs out of date, run scripts/gen_protos.sh: {stale}"


def test_the_package_is_versioned():
    from protos.videollm.v1 import encoder_pb2, llm_pb2

    assert encoder_pb2.DESCRIPTOR.package == "videollm.v1"
    assert llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name == "videollm.v1.LLM"
    assert encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name == "videollm.v1.Encoder"



@pytest.mark.parametrize("service", ["Encoder", "LLM"])
def test_our_registration_serves_every_method_of_the_service(service):
    """Both services register their handlers by hand (streams carry pre-serialized chunks)."""
    import grpc

    from protos.videollm.v1 import encoder_pb2, llm_pb2
    from videollm import transport

    register, name, descriptor = {
        "Encoder": (transport.add_encoder_servicer, transport.ENCODER_SERVICE, encoder_pb2.DESCRIPTOR),
        "LLM": (transport.add_llm_servicer, transport.LLM_SERVICE, llm_pb2.DESCRIPTOR),
    }[service]

    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    class AnyServicer:
        def __getattr__(self, method):
            return lambda request, context: None

    recorder = Recorder()
    register(AnyServicer(), recorder)
    (handler,) = recorder.handlers
    for method in descriptor.services_by_name[service].methods:
        details = type("Details", (), {"method": transport.method_path(name, method.name)})()
        found = handler.service(details)
        assert isinstance(found, grpc.RpcMethodHandler), method.name
        assert (found.request_streaming, found.response_streaming) == (method.client_streaming,
                                                                       method.server_streaming)
