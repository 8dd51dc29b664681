"""`videollm eval` against the real stack on the tiny model: datasets in MVBench's and VideoMME's
layouts, asked of every served model name, and lmms-eval's answer parsers.

The tiny model's answers are meaningless, so the plumbing is tested (a row per model, every question
asked, each video uploaded once, the visual tokens each preset implies, the JSON), not the accuracy.
The parsers' expected values were computed with lmms-eval 0.7.3's own functions (mcq_acc,
extract_mcq_answer); lmms-eval is not needed here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from conftest import GatewayServer, gateway_settings
from videollm.cli import main
from videollm.evaluation import (Model, extract_mcq_answer, load_questions, mvbench_correct, mvbench_prompt,
                                 videomme_prompt)
from videos import make_video

FRAMES = "4"  # few frames and tokens: the tiny model on the CPU, 4 models x 6 questions
ARGS = ["--frames", FRAMES, "--max-tokens", "3", "--concurrency", "2"]


def uploads(gateway) -> float:
    """POST /v1/videos calls the gateway has answered, from its metrics."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r'^videollm_requests_total\{route="/v1/videos".*\} (\S+)$',
                                                     text, re.M))


def eval_command(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(["eval", *args])
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def table_rows(out: str) -> dict[str, list[str]]:
    """The first table's rows by model name (the full-token one's "(full)" mark kept)."""
    first = out.split("\n\n")[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in first.splitlines()[2:]]
    return {row[0]: row for row in rows}


def mvbench_dataset(root: Path) -> Path:
    """2 tasks x 3 questions, 5 clips (one shared by two questions); moving_count's clips lie under
    data0613/, as some of HF MVBench's do."""
    clips = {f"clip{n}.mp4": make_video("mp4", seed=100 + n, n_frames=12) for n in range(5)}
    tasks = {"action_sequence": ("star/Charades_segment", ["clip0.mp4", "clip1.mp4", "clip0.mp4"]),
             "moving_count": ("data0613/clevrer/video_validation", ["clip2.mp4", "clip3.mp4", "clip4.mp4"])}
    (root / "json").mkdir(parents=True)
    for task, (folder, videos) in tasks.items():
        (root / "video" / folder).mkdir(parents=True)
        for video in videos:
            (root / "video" / folder / video).write_bytes(clips[video])
        rows = [{"video": video, "question": f"What happens in {task} {n}?",
                 "candidates": ["a person walks", "a ball rolls", "nothing"], "answer": "a ball rolls"}
                for n, video in enumerate(videos)]
        (root / "json" / f"{task}.json").write_text(json.dumps(rows))
    return root


def videomme_dataset(root: Path) -> Path:
    """4 rows as JSON lines over 2 videos (one .MP4, which lmms-eval tries too) and 2 task types."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "v001.mp4").write_bytes(make_video("mp4", seed=201, n_frames=12))
    (root / "data" / "v002.MP4").write_bytes(make_video("mp4", seed=202, n_frames=12))
    rows = [{"videoID": video, "question_id": f"{video}-{n}", "question": f"Question {n}?",
             "options": ["A. red", "B. green", "C. blue", "D. none"], "answer": "ABCD"[n], "duration": "short",
             "domain": "Knowledge", "sub_category": "Humanity", "task_type": task}
            for n, (video, task) in enumerate([("v001", "Counting Problem"), ("v001", "Action Recognition"),
                                               ("v002", "Counting Problem"), ("v002", "Action Recognition")])]
    (root / "videomme.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_mvbench_every_model_every_question_each_video_uploaded_once(gateway, tmp_path, capsys):
    data = mvbench_dataset(tmp_path / "mvbench")
    models = httpx.get(f"{gateway.url}/v1/models", timeout=30).json()["data"]
    names = [model["id"] for model in models]
    assert {"videollm", "videollm-full", "videollm-r0.25", "videollm-r0.1"} <= set(names)
    before = uploads(gateway)

    code, out, err = eval_command(capsys, "--data", str(data), "--layout", "mvbench", "--url", gateway.url,
                                  "--out", str(tmp_path / "results.json"), *ARGS)
    print(out)
    assert code == 0, out + err
    assert uploads(gateway) - before == 5  # 5 distinct clips for 6 questions x 4 models

    rows = table_rows(out)
    assert list(rows)[0] == "videollm-full (full)"  # the full-token row first, marked
    assert set(rows) == {"videollm-full (full)", "videollm", "videollm-r0.25", "videollm-r0.1"}
    for name, row in rows.items():
        _, compression, questions, answered, accuracy, vs_full, ttft, visual, prompt, failed = row
        assert (questions, failed) == ("6", "0"), row
        assert 0 <= int(answered) <= 6 and ttft != "-" and float(prompt) > float(visual) > 0
    assert rows["videollm-full (full)"][1] == "none (full)" and rows["videollm-full (full)"][5] == "baseline"
    assert rows["videollm"][1] == "server default"
    assert rows["videollm-r0.1"][1] == "retain 0.1"
    visual = {name: float(row[7]) for name, row in rows.items()}
    assert visual["videollm-full (full)"] == int(FRAMES) * 196 + 1  # every token, the video's newline included
    assert visual["videollm-full (full)"] > visual["videollm-r0.25"] > visual["videollm-r0.1"]
    # the per-task table: a row per task, a column per model
    assert "| action_sequence |" in out and "| moving_count |" in out

    document = json.loads((tmp_path / "results.json").read_text())
    assert (document["layout"], document["frames"]) == ("mvbench", int(FRAMES))
    results = document["results"]
    assert len(results) == 24 and all(r["error"] is None and r["text"] is not None for r in results)
    assert sorted({r["question"] for r in results}) == [f"{task}/{n}" for task in ("action_sequence", "moving_count")
                                                        for n in range(3)]
    assert {r["answer"] for r in results} == {"B"}  # the right candidate's letter
    for r in results:
        assert r["cache"] in ("hit", "miss") and r["visual_tokens"] > 0 and r["prompt_tokens"] > r["visual_tokens"]
        assert r["correct"] == mvbench_correct("B", r["text"])
    summary = {row["model"]: row for row in document["summary"]}
    assert {name: row["questions"] for name, row in summary.items()} == dict.fromkeys(names, 6)


def test_videomme_jsonl_with_a_limit_and_chosen_models(gateway, tmp_path, capsys):
    data = videomme_dataset(tmp_path / "videomme")
    code, out, err = eval_command(capsys, "--data", str(data), "--layout", "videomme", "--url", gateway.url,
                                  "--models", "videollm-r0.1,videollm-full", "--limit", "3",
                                  "--out", str(tmp_path / "vm.json"), *ARGS)
    print(out)
    assert code == 0, out + err
    rows = table_rows(out)
    assert list(rows) == ["videollm-full (full)", "videollm-r0.1"]
    assert all((row[2], row[3], row[9]) == ("3", "3", "0") for row in rows.values())  # every question answered
    assert "| Counting Problem |" in out and "| Action Recognition |" in out
    results = json.loads((tmp_path / "vm.json").read_text())["results"]
    assert sorted(r["question"] for r in results if r["model"] == "videollm-r0.1") == ["v001-0", "v001-1", "v002-2"]
    assert any(r["video"].endswith("v002.MP4") for r in results)
    for r in results:
        assert r["pred"] == extract_mcq_answer(r["text"], ["A", "B", "C", "D"])
        assert r["correct"] == (r["pred"].lower() == r["answer"].lower())


def test_every_request_failing_exits_1_with_the_servers_message(gateway, tmp_path, capsys):
    data = videomme_dataset(tmp_path / "videomme")
    code, out, _ = eval_command(capsys, "--data", str(data), "--layout", "videomme", "--url", gateway.url,
                                "--models", "videollm-full", "--frames", "5000", "--limit", "2")
    assert code == 1
    assert table_rows(out)["videollm-full (full)"][9] == "2"
    assert "2 of 2 requests failed" in out and "400:" in out


def test_the_api_key_is_sent_from_the_flag_or_the_environment(encoder_service, llm_service, redis_server,
                                                              tmp_path, capsys, monkeypatch):
    data = videomme_dataset(tmp_path / "videomme")
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                max_upload_bytes=8 << 20, api_keys=["eval-key"])
    args = ["--data", str(data), "--layout", "videomme", "--models", "videollm-r0.1", "--limit", "1", *ARGS]
    with GatewayServer(settings) as secured:
        monkeypatch.delenv("VIDEOLLM_API_KEY", raising=False)
        code, _, err = eval_command(capsys, *args, "--url", secured.url)
        assert code == 2 and "401" in err  # GET /v1/models refused: stopped before any question
        assert eval_command(capsys, *args, "--url", secured.url, "--api-key", "eval-key")[0] == 0
        monkeypatch.setenv("VIDEOLLM_API_KEY", "eval-key")
        assert eval_command(capsys, *args, "--url", secured.url)[0] == 0


def test_a_missing_video_is_named_before_any_request(tmp_path, capsys):
    data = mvbench_dataset(tmp_path / "mvbench")
    missing = data / "video" / "data0613" / "clevrer" / "video_validation" / "clip3.mp4"
    missing.unlink()
    # nothing listens on port 9: the dataset is checked before the server is asked anything
    code, _, err = eval_command(capsys, "--data", str(data), "--layout", "mvbench", "--url", "http://127.0.0.1:9")
    assert code == 2
    assert str(data / "video" / "clevrer" / "video_validation" / "clip3.mp4") in err and str(missing) in err

    vm = videomme_dataset(tmp_path / "videomme")
    (vm / "data" / "v002.MP4").unlink()
    code, _, err = eval_command(capsys, "--data", str(vm), "--layout", "videomme", "--url", "http://127.0.0.1:9")
    assert code == 2 and str(vm / "data" / "v002.mp4") in err


def test_an_unknown_model_is_refused_before_any_question(gateway, tmp_path, capsys):
    data = videomme_dataset(tmp_path / "videomme")
    code, _, err = eval_command(capsys, "--data", str(data), "--layout", "videomme", "--url", gateway.url,
                                "--models", "videollm-r0.5")
    assert code == 2 and "videollm-r0.5" in err and "videollm-full" in err


def test_lmms_eval_prompts():
    assert mvbench_prompt("What moves?", ["a ball", "a cube"]) == \
        "Question:What moves?\nOption:\n(A) a ball\n(B) a cube\nOnly give the best option.\n"
    assert videomme_prompt("How many?", ["A. 1", "B. 2"]) == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nHow many?\nA. 1\nB. 2\n"
        "\nAnswer with the option's letter from the given choices directly.")


def test_the_questions_of_each_layout(tmp_path):
    questions = load_questions(mvbench_dataset(tmp_path / "mv"), "mvbench", limit=2)
    assert [(q.id, q.answer, q.video.name) for q in questions] == [
        ("action_sequence/0", "B", "clip0.mp4"), ("action_sequence/1", "B", "clip1.mp4"),
        ("moving_count/0", "B", "clip2.mp4"), ("moving_count/1", "B", "clip3.mp4")]
    questions = load_questions(videomme_dataset(tmp_path / "vm"), "videomme")
    assert [(q.id, q.task, q.answer) for q in questions] == [
        ("v001-0", "Counting Problem", "A"), ("v001-1", "Action Recognition", "B"),
        ("v002-2", "Counting Problem", "C"), ("v002-3", "Action Recognition", "D")]


def test_compression_descriptions():
    assert Model("m", {}).describe() == "server default"
    assert Model("m", {"method": "none"}).describe() == "none (full)" and Model("m", {"method": "none"}).full
    assert Model("m", {"retain_ratio": 0.1}).describe() == "retain 0.1"
    assert Model("m", {"retain_ratio": 0.25, "tau": 0.5}).describe() == "retain 0.25, tau 0.5"


# (model output, the letters that mcq_acc(letter, output) scores right), from lmms-eval's mcq_acc
MVBENCH_CASES = [
    ("A", "A"), ("(A)", "A"), ("(A) the dog", "A"), ("A. the dog", "A"), ("a. the dog", "A"), ("b", "B"),
    ("The answer is B.", "B"), ("a person walks", "A"),  # any standalone a-e counts, even the article
    ("I think it is (C) running", "C"), ("Option C", "C"), ("e.g. the cat", "E"), ("", ""), ("none of these", ""),
    ("D)", "D"), ("(B", "B"), ("answer: D", "D"), ("'C'", "C"), ('"D"', "D"), ("1,000 A", "A"),
    ("Best option: (E) fall", "E"), ("ABC", ""), ("Cat", ""), ("C-3PO", "C"), ("the ball is red", ""),
    ("." * 40 + " B", "B"), ("A/B", "A"), ("x\nB\tz", "B"), ("F", "F"), ("(F) six", ""),
]


@pytest.mark.parametrize("output, right", MVBENCH_CASES)
def test_mvbench_parser_matches_lmms_eval(output, right):
    assert [letter for letter in "ABCDEF" if mvbench_correct(letter, output)] == list(right)


def test_mvbench_parser_quirks_of_lmms_eval():
    # re.UNICODE passed as sub's count: only the first 32 periods are stripped
    assert not mvbench_correct("." * 33 + "x", "x") and mvbench_correct("." * 32 + "x", "x")
    # punctuation next to a space is deleted, otherwise it becomes a space
    assert mvbench_correct("dog - cat", "dog  cat") and not mvbench_correct("dog - cat", "dog cat")
    assert mvbench_correct("dog-cat", "dog cat") and mvbench_correct("1,000 cats", "1000 cats")


# (model output, extract_mcq_answer(output, ["A", "B", "C", "D"])), from lmms-eval
VIDEOMME_CASES = [
    ("A", "A"), ("(B)", "B"), ("The answer is C.", "C"), ("C. Running", "C"), ("Answer: D", "D"),
    ("I choose B because A is wrong", "A"), ("A and B", "A"), ("B) dog", "B"),
    ("Both A and D are possible, but the best answer is D", "D"), ("None", ""), ("", ""), ("  ", ""), ("E", ""),
    ("Dog", "D"), ("The correct option is (A).", "A"), ("答案是B", "B"), ("A. Because B.", "A"),
    ("I think (C) or (D)", "D"), ("Apple", "A"), ("a", ""), ("It is B", "B"), ("B C", "B"), ("c", ""),
    ("(A) cat (B) dog", "B"), ("D:", "D"), ("xAx", "A"),
]


@pytest.mark.parametrize("output, letter", VIDEOMME_CASES)
def test_videomme_parser_matches_lmms_eval(output, letter):
    assert extract_mcq_answer(output, ["A", "B", "C", "D"]) == letter
