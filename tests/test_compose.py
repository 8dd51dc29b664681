"""Static checks of docker-compose.yml, since no Docker engine runs where the tests do.

- The file validates against the Compose Specification's JSON schema (and a broken copy does not,
  so the validation cannot pass vacuously).
- Every service built from our Dockerfile (entrypoint `videollm`) has a command that the real CLI
  parser accepts, so a renamed or removed flag breaks this test instead of a deployment.
- The encoder and LLM reserve a GPU and publish no host port and no container_name, so that
  `docker compose up --scale encoder=N --scale llm=N` works.
- The gateway's --encoders/--llms name the encoder and LLM services on the ports they listen on.

tests/data/compose-spec.json is the Compose Specification schema (schema/compose-spec.json of
github.com/compose-spec/compose-spec, Apache-2.0), copied verbatim from the npm package
dclint 3.1.0 (MIT), file schemas/compose.schema.json; sha256 46b7d35f19dd93a05f8fea530291bf84
d881c1791ec167ecf0e6fb94e639d496. It is a recent schema (top-level `models`, `gpus`) that knows
deploy.resources.reservations.devices. To update it, take the newer file from compose-spec.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from videollm.cli import build_parser
from videollm.settings import EncoderSettings, LLMSettings

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # safe_load resolves `<<:` merges
SERVICES = COMPOSE["services"]
OURS = sorted(name for name, service in SERVICES.items() if "build" in service)
GPU_SERVICES = {"encoder": EncoderSettings, "llm": LLMSettings}


# The schema says "$schema": "https://json-schema.org/draft-07/schema", a spelling jsonschema does
# not look up (it would fall back to the latest draft with a warning), so the draft is named here.
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def schema_errors(document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in VALIDATOR.iter_errors(document)]


def parse(name: str):
    command = SERVICES[name].get("command")
    assert isinstance(command, list), f"service {name}: `command` must be a list, got {command!r}"
    try:
        return build_parser().parse_args([str(arg) for arg in command])
    except SystemExit:
        pytest.fail(f"service {name}: `videollm {' '.join(map(str, command))}` is rejected by the CLI parser")


def listen_port(name: str) -> int:
    return parse(name).port or GPU_SERVICES[name].model_fields["port"].default


def test_schema_is_the_compose_spec():
    assert SCHEMA["$id"] == "compose_spec.json" and SCHEMA["title"] == "Compose Specification"
    assert "draft-07" in SCHEMA["$schema"]
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert "devices" in SCHEMA["definitions"]["deployment"]["properties"]["resources"]["properties"]["reservations"]["properties"]


def test_compose_file_matches_the_schema():
    assert schema_errors(COMPOSE) == []


@pytest.mark.parametrize("break_it", [
    lambda doc: doc["services"]["encoder"].update(container_nmae="typo"),
    lambda doc: doc["services"]["llm"]["deploy"]["resources"]["reservations"]["devices"][0].update(capabilities="gpu"),
    lambda doc: doc["services"]["gateway"]["depends_on"]["redis"].update(condition="service_ready"),
], ids=["unknown-key", "capabilities-not-a-list", "bad-condition"])
def test_schema_rejects_a_broken_copy(break_it):
    broken = copy.deepcopy(COMPOSE)
    break_it(broken)
    assert schema_errors(broken), "the schema accepted an invalid compose file: validation is not working"


def test_dockerfile_entrypoint_is_the_cli():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["videollm"\]$', dockerfile, re.M), "commands below assume ENTRYPOINT videollm"
    assert all(SERVICES[name]["build"] in (".", {"context": "."}) for name in OURS)


def test_the_image_gets_every_shipped_package():
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in (pattern.rstrip("*.") for pattern in include):
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.M), f"the Dockerfile does not copy {package}"


def test_expected_services():
    assert {"redis", "encoder", "llm", "gateway"} <= set(SERVICES)
    assert set(OURS) >= {"encoder", "llm", "gateway"}


@pytest.mark.parametrize("name", OURS)
def test_command_is_accepted_by_the_cli(name):
    args = parse(name)
    assert args.command == name, f"service {name} runs `videollm {args.command}`"
    assert args.host == "0.0.0.0", f"service {name} must listen on all interfaces, not loopback"


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_gpu_service_reserves_a_gpu_and_scales(name):
    service = SERVICES[name]
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    assert any(d.get("driver") == "nvidia" and d.get("count") == 1 and "gpu" in d.get("capabilities", [])
               for d in devices), f"{name} reserves no NVIDIA GPU"
    assert parse(name).device == "cuda"
    assert "container_name" not in service, f"{name} has a container_name: it cannot be scaled"
    assert "ports" not in service, f"{name} publishes host ports: replicas would clash"
    models = [v for v in service.get("volumes", []) if isinstance(v, dict) and v.get("target") == "/models"]
    assert models and models[0].get("read_only") is True, f"{name} must mount the models read-only at /models"
    assert str(parse(name).model) == "/models"
    assert f"127.0.0.1:{listen_port(name)}" in " ".join(service["healthcheck"]["test"])


def test_gateway_points_at_the_scaled_services():
    gateway = SERVICES["gateway"]
    args = parse("gateway")
    for flag, service in [("encoders", "encoder"), ("llms", "llm")]:
        targets = getattr(args, flag)
        assert targets == [f"dns:///{service}:{listen_port(service)}"], (
            f"--{flag} must be the {service} service's DNS name on its port, got {targets}")
    assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert any(str(p).split(":")[-1] == "8000" for p in gateway["ports"]) and (args.port or 8000) == 8000
    assert {name: dep["condition"] for name, dep in gateway["depends_on"].items()} == {
        "redis": "service_healthy", "encoder": "service_healthy", "llm": "service_healthy"}
    for name in ["redis", "encoder", "llm", "gateway"]:
        assert SERVICES[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
