"""The committed Python stubs are what protoc makes of the .proto files (so a fresh clone works)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_encoder_registration_serves_every_method_of_the_service():
    import grpc

    from encoder_service import server as encoder_server
    from protos.videollm.v1 import encoder_pb2

    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    recorder = Recorder()
    encoder_server.add_to_server(object.__new__(encoder_server.EncoderServicer), recorder)
    (handler,) = recorder.handlers
    methods = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].methods
    for method in methods:
        details = type("Details", (), {"method": f"/{encoder_server.SERVICE_NAME}/{method.name}"})()
        found = handler.service(details)
        assert isinstance(found, grpc.RpcMethodHandler), method.name
        assert found.response_streaming == method.server_streaming


def test_the_llm_registration_serves_every_method_of_the_service():
    import grpc

    from llm_service import server as llm_server
    from protos.videollm.v1 import llm_pb2

    class Recorder:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    recorder = Recorder()
    llm_server.add_to_server(object.__new__(llm_server.LLMServicer), recorder)
    (handler,) = recorder.handlers
    for method in llm_pb2.DESCRIPTOR.services_by_name["LLM"].methods:
        details = type("Details", (), {"method": f"/{llm_server.SERVICE_NAME}/{method.name}"})()
        found = handler.service(details)
        assert isinstance(found, grpc.RpcMethodHandler), method.name
        assert (found.request_streaming, found.response_streaming) == (method.client_streaming,
                                                                       method.server_streaming)
