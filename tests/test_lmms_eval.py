"""The official lmms-eval (0.7.3 from PyPI, in .venv-lmms-eval: scripts/setup_lmms_eval.sh)
evaluates the server through its `openai` adapter, unpatched: a local task in MVBench's format
(MVBench's own prompt and answer parsing, imported from lmms-eval) on clips made here, once with
`pass_video_url` (file:// paths under the gateway's local_video_roots) and once with the frames
sent as images, each at two compression presets chosen by model name. Every request must succeed
and the gateway's log must show each preset's compression applied to each question.

The embedded default model answers nonsense, so the accuracy is not checked; the plumbing is.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GatewayServer, gateway_settings
from videos import make_video

REPO = Path(__file__).resolve().parent.parent
LMMS_EVAL = REPO / ".venv-lmms-eval" / "bin" / "lmms-eval"
TASK = "videollm_mvbench_local"
QUESTIONS = 4
FRAMES = 8

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data_files}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.mvbench_doc_to_text
doc_to_target: answer
process_results: !function utils.mvbench_process_results
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
metric_list:
  - metric: mvbench_accuracy
    aggregation: !function utils.mvbench_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    sub_task: action_sequence
    post_prompt: "Only give the best option.\\n"
"""

# MVBench's prompt, answer parsing and score, as lmms-eval ships them; only where the videos are differs
TASK_UTILS = """\
import os

from lmms_eval.tasks.mvbench.utils import (DATA_LIST, mvbench_aggregate_results, mvbench_doc_to_text,  # noqa: F401
                                           mvbench_process_results)


def doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    folder = DATA_LIST[lmms_eval_specific_kwargs["sub_task"]]
    return [os.path.join(os.environ["VIDEOLLM_EVAL_DATA"], "video", folder, doc["video"])]
"""


@pytest.fixture(scope="module")
def mvbench_like(tmp_path_factory) -> Path:
    """MVBench's layout: json/<task>.json and the task's videos under video/<its folder>/."""
    root = tmp_path_factory.mktemp("mvbench-like")
    videos = root / "video" / "star" / "Charades_segment"  # action_sequence's folder in MVBench
    videos.mkdir(parents=True)
    for clip in range(3):
        (videos / f"clip{clip}.mp4").write_bytes(make_video("mp4", seed=1100 + clip, n_frames=24))
    candidates = ["a ball", "a cat", "a car"]
    questions = [{"video": f"clip{i % 3}.mp4", "question": f"What moves in scene {i}?", "candidates": candidates,
                  "answer": candidates[i % 3]} for i in range(QUESTIONS)]
    (root / "json").mkdir()
    (root / "json" / "action_sequence.json").write_text(json.dumps(questions))
    return root


@pytest.fixture(scope="module")
def task_dir(mvbench_like, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lmms-eval-task")
    (directory / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK,
                                                             data_files=mvbench_like / "json" / "action_sequence.json"))
    (directory / "utils.py").write_text(TASK_UTILS)
    return directory


@pytest.fixture(scope="module")
def evaluated_gateway(encoder_service, llm_service, redis_server, mvbench_like):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                local_video_roots=[str(mvbench_like)])
    with GatewayServer(settings) as server:
        yield server


def run_lmms_eval(gateway, task_dir: Path, data: Path, out: Path, model: str, pass_video_url: bool) -> list[dict]:
    """One lmms-eval run as its README shows it; the samples it logged."""
    assert LMMS_EVAL.exists(), "lmms-eval is not installed: run scripts/setup_lmms_eval.sh (scripts/test does)"
    out.mkdir(parents=True)
    args = [f"model_version={model}", f"base_url={gateway.url}/v1", "api_key=EMPTY", f"max_frames_num={FRAMES}",
            "num_concurrent=2", "max_retries=1"] + (["pass_video_url=True"] if pass_video_url else [])
    env = {**os.environ, "VIDEOLLM_EVAL_DATA": str(data), "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "FORCE_QWENVL_VIDEO_READER": "decord"}  # the frames' reader when they go as images
    done = subprocess.run([str(LMMS_EVAL), "--model", "openai", "--model_args", ",".join(args), "--tasks", TASK,
                           "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(out),
                           "--log_samples"], capture_output=True, text=True, timeout=900, env=env, cwd=out)
    logged = sorted(out.rglob(f"*samples_{TASK}.jsonl"))
    # lmms-eval exits 0 after an error too: its samples are the evidence
    assert logged, f"lmms-eval wrote no samples (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in logged[-1].read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("pass_video_url", [True, False], ids=["video-file-urls", "frames-as-images"])
def test_lmms_eval_evaluates_the_server_at_two_presets(evaluated_gateway, task_dir, mvbench_like, tmp_path,
                                                       pass_video_url, caplog):
    caplog.set_level(logging.INFO, logger="gateway.chat")
    expected = {"videollm-r0.25": "compression=earlytom retain_ratio=0.25", "videollm-r0.1":
                "compression=earlytom retain_ratio=0.1"}
    visual_tokens = {}
    for model, compression in expected.items():
        caplog.clear()
        samples = run_lmms_eval(evaluated_gateway, task_dir, mvbench_like, tmp_path / model, model, pass_video_url)
        assert len(samples) == QUESTIONS
        for sample in samples:
            answer = sample["filtered_resps"] if isinstance(sample["filtered_resps"], str) else sample["filtered_resps"][0]
            assert "LMMS_EVAL_REQUEST_FAILED" not in str(answer), answer
            assert sample["mvbench_accuracy"]["gt_answer"] in "ABC"  # scored by MVBench's own parser
        lines = [r.getMessage() for r in caplog.records if r.name == "gateway.chat" and f"model={model} " in r.getMessage()]
        assert len(lines) == QUESTIONS, lines
        for line in lines:
            assert "status=200" in line and compression in line and f"frames={FRAMES} " in line, line
            assert ("video=file" in line) == pass_video_url and (f"video={FRAMES}-images" in line) != pass_video_url
        visual_tokens[model] = {int(line.split("visual_tokens=")[1].split()[0]) for line in lines}
        # usage.prompt_tokens, as lmms-eval logged it, counts the visual tokens
        assert all(sample["token_counts"][0]["input_tokens"] > max(visual_tokens[model]) for sample in samples)
    assert min(visual_tokens["videollm-r0.25"]) > max(visual_tokens["videollm-r0.1"])


def test_videollm_eval_on_the_same_data_gives_lmms_eval_s_answers_and_scores(evaluated_gateway, task_dir,
                                                                            mvbench_like, tmp_path):
    samples = run_lmms_eval(evaluated_gateway, task_dir, mvbench_like, tmp_path / "lmms", "videollm-r0.1", True)
    out = tmp_path / "ours.json"
    done = subprocess.run([sys.executable, "-m", "videollm.cli", "eval", "--data", str(mvbench_like), "--layout",
                           "mvbench", "--url", evaluated_gateway.url, "--models", "videollm-full,videollm-r0.1",
                           "--frames", str(FRAMES), "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    table = done.stdout.splitlines()
    assert table[2].startswith("| videollm-full (full) | none (full) | 4 | 4 |")  # the full-token row first
    assert table[3].startswith("| videollm-r0.1 | retain 0.1 | 4 | 4 |")
    ours = {int(r["question"].split("/")[1]): r for r in json.loads(out.read_text())["results"]
            if r["model"] == "videollm-r0.1"}
    for sample in samples:  # the same prompt, frames and preset: the same answer, scored the same
        theirs = sample["mvbench_accuracy"]
        mine = ours[sample["doc_id"]]
        assert mine["text"].strip() == theirs["pred_answer"].strip()
        assert mine["correct"] == bool(theirs["score"]) and mine["answer"] == theirs["gt_answer"]
