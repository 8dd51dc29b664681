"""`videollm eval`: accuracy of each served model name (compression preset) on a multiple-choice video
benchmark on disk, asked through the REST API, scored as lmms-eval scores it.

The prompts and the answer parsers are copies of lmms-eval 0.7.3's (tasks/mvbench/utils.py,
tasks/videomme/utils.py, tasks/_task_utils/mcq_extract.py), quirks included, so the numbers are
comparable with lmms-eval's; lmms-eval itself is not a dependency. The denominators are theirs too:
MVBench counts the non-empty answers (mvbench_aggregate_results), VideoMME every question answered.
A request the server refused or failed is neither: it is counted apart as failed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import string
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# ---------------------------------------------------------------------------------------------------------
# The datasets: every question as a prompt, a video file and the right letter.

# lmms-eval's DATA_LIST: the folder under video/ that holds each MVBench task's clips.
MVBENCH_FOLDERS = {
    "object_interaction": "star/Charades_segment",
    "action_sequence": "star/Charades_segment",
    "action_prediction": "star/Charades_segment",
    "action_localization": "sta/sta_video_segment",
    "moving_count": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "character_order": "perception/videos",
    "object_shuffle": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "moving_direction": "clevrer/video_validation",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "scene_transition": "scene_qa/video",
    "state_change": "perception/videos",
    "moving_attribute": "clevrer/video_validation",
    "action_antonym": "ssv2_video_mp4",
    "unexpected_action": "FunQA_test/test",
    "counterfactual_inference": "clevrer/video_validation",
    "object_existence": "clevrer/video_validation",
    "action_count": "perception/videos",
}
MVBENCH_POST_PROMPT = "Only give the best option.\n"
VIDEOMME_OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and "
                          "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_SUFFIXES = (".mp4", ".MP4", ".mkv")  # the order lmms-eval tries them in
LAYOUTS = ("mvbench", "videomme")


class EvalError(Exception):
    """A problem with the dataset, the arguments or the server that stops the run before it starts."""


@dataclass(frozen=True)
class Question:
    id: str
    task: str
    video: Path
    prompt: str
    answer: str  # the right option's letter


def mvbench_prompt(question: str, candidates: list[str]) -> str:
    options = "".join(f"({letter}) {candidate}\n" for letter, candidate in zip(string.ascii_uppercase, candidates))
    return "Question:" + question + "\nOption:\n" + options + MVBENCH_POST_PROMPT


def videomme_prompt(question: str, options: list[str]) -> str:
    return VIDEOMME_OPTION_PROMPT + "\n" + question + "\n" + "\n".join(options) + "\n" + VIDEOMME_POST_PROMPT


def mvbench_video(root: Path, task: str, name: str) -> Path:
    folder = MVBENCH_FOLDERS.get(task, task)
    path = root / "video" / folder / name
    if path.exists():
        return path
    # HF's MVBench keeps some clips under data0613/ (lmms-eval's fallback; it is tried for every folder here)
    fallback = root / "video" / "data0613" / folder / name
    if fallback.exists():
        return fallback
    raise EvalError(f"MVBench task {task}: video {path} does not exist (nor {fallback})")


def load_mvbench(root: Path, limit: int | None = None) -> list[Question]:
    files = sorted((root / "json").glob("*.json"))
    if not files:
        raise EvalError(f"no MVBench task files: {root / 'json'}/*.json")
    questions = []
    for file in files:
        task = file.stem
        for number, row in enumerate(json.loads(file.read_text())[:limit]):
            if row["answer"] not in row["candidates"]:
                raise EvalError(f"{file} question {number}: the answer {row['answer']!r} is not one of its candidates")
            questions.append(Question(
                id=f"{task}/{number}", task=task, video=mvbench_video(root, task, row["video"]),
                prompt=mvbench_prompt(row["question"], row["candidates"]),
                answer=string.ascii_uppercase[row["candidates"].index(row["answer"])]))
    return questions


def videomme_rows(root: Path) -> list[dict]:
    if (root / "videomme.json").exists():
        return json.loads((root / "videomme.json").read_text())
    if (root / "videomme.jsonl").exists():
        return [json.loads(line) for line in (root / "videomme.jsonl").read_text().splitlines() if line.strip()]
    raise EvalError(f"no VideoMME questions: neither {root / 'videomme.json'} nor {root / 'videomme.jsonl'} exists")


def videomme_video(root: Path, video_id: str) -> Path:
    for suffix in VIDEOMME_SUFFIXES:
        path = root / "data" / f"{video_id}{suffix}"
        if path.exists():
            return path
    raise EvalError(f"VideoMME video {root / 'data' / video_id}.mp4 does not exist (nor .MP4 or .mkv)")


def load_videomme(root: Path, limit: int | None = None) -> list[Question]:
    return [Question(id=str(row["question_id"]), task=row.get("task_type") or "all",
                     video=videomme_video(root, row["videoID"]),
                     prompt=videomme_prompt(row["question"], row["options"]), answer=row["answer"])
            for row in videomme_rows(root)[:limit]]


def load_questions(root: Path, layout: str, limit: int | None = None) -> list[Question]:
    """Every question, its video checked to exist (so a missing file stops the run before any request)."""
    try:
        return {"mvbench": load_mvbench, "videomme": load_videomme}[layout](root, limit)
    except (KeyError, TypeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise EvalError(f"{root}: not a {layout} dataset: {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# The answer parsers, ported line by line from lmms-eval.

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead for "<=", lmms-eval's typo of a lookbehind
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _mvbench_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # lmms-eval passes re.UNICODE as sub's third argument, which is `count`: at most 32 periods go
    return _PERIOD_STRIP.sub("", out, count=re.UNICODE)


def mvbench_letter(text: str) -> str:
    """lmms-eval's mcq_acc `process`: the option letter found in `text`, else the text normalised."""
    match = _OPTION.match(text.strip())
    if match:
        return match.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _mvbench_punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _LETTER.search(text)  # any standalone a-e, so "a person ..." reads as A (lmms-eval's quirk)
    return letter.group(1).upper() if letter else text


def mvbench_correct(answer: str, pred: str) -> bool:
    """lmms-eval's mcq_acc(answer, pred)."""
    return mvbench_letter(pred) == mvbench_letter(answer)


_ANSWER_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:",  # Korean
    "答案是", "答案为", "选",  # Chinese
    "答えは",  # Japanese
]
_FORMAT_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                    "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: list[str] | None = None) -> str:
    """lmms-eval's extract_mcq_answer: the choice letter of the highest-priority format in `response`
    (the last occurrence within a format), or "" when there is none."""
    if not response or not response.strip():
        return ""
    all_choices = choices or ["A", "B", "C", "D", "E", "F", "G", "H"]
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "  # padded for boundary matching

    candidates: list[tuple[str, int, str]] = []  # (letter, position, format)
    for template, name in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                           ("{} ", "space")):
        for ch in all_choices:
            if template.format(ch) in text:
                candidates.append((ch, text.rfind(template.format(ch)), name))
    text_lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = text_lower.find(phrase)
        if idx != -1:
            for ch in all_choices:
                position = text.find(ch, idx + len(phrase))
                if position != -1:
                    candidates.append((ch, position, "phrase"))
    stripped = text.strip()
    for ch in all_choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in all_choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        for ch in all_choices:
            if ch in text:
                candidates.append((ch, text.rfind(ch), "fallback"))
    if not candidates:
        return ""
    # stable sort, as lmms-eval's: of equal keys the earlier-found candidate wins
    candidates.sort(key=lambda c: (_FORMAT_PRIORITY.get(c[2], 0), c[1]), reverse=True)
    return candidates[0][0]


def score(layout: str, answer: str, text: str) -> tuple[str, bool, bool]:
    """(the parsed prediction, whether it counts as answered, whether it is right), as lmms-eval scores it."""
    if layout == "mvbench":
        return mvbench_letter(text), text != "", mvbench_correct(answer, text)
    pred = extract_mcq_answer(text, choices=["A", "B", "C", "D"])
    return pred, True, pred.lower() == answer.lower()


# ---------------------------------------------------------------------------------------------------------
# The server: models, uploads and questions.

@dataclass(frozen=True)
class Model:
    name: str
    compression: dict[str, Any]  # the preset's overrides ({} = the server's defaults)

    @property
    def full(self) -> bool:
        return self.compression.get("method") == "none"

    def describe(self) -> str:
        if not self.compression:
            return "server default"
        parts = []
        for key, value in self.compression.items():
            if key == "method":
                parts.append("none (full)" if value == "none" else str(value))
            elif key == "retain_ratio":
                parts.append(f"retain {value:g}")
            else:
                parts.append(f"{key} {value}")
        return ", ".join(parts)


@dataclass
class Result:
    model: str
    question: str
    task: str
    video: str
    answer: str
    text: str | None = None
    pred: str | None = None
    answered: bool = False
    correct: bool = False
    visual_tokens: int | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    cache: str | None = None
    error: str | None = None


def error_message(response: httpx.Response) -> str:
    """The server's own message (OpenAI's error shape) when it gave one, else the body."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return f"{response.status_code}: {message}"


class Server:
    def __init__(self, url: str, api_key: str | None, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # one client for every thread (httpx.Client is thread-safe); long videos take long to encode
        self.http = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def models(self) -> list[Model]:
        try:
            response = self.http.get("/v1/models")
        except httpx.HTTPError as err:
            raise EvalError(f"cannot reach {self.http.base_url}: {err}") from None
        if response.status_code != 200:
            raise EvalError(f"GET /v1/models: {error_message(response)}")
        return [Model(entry["id"], entry.get("videollm_compression") or {}) for entry in response.json()["data"]]

    def upload(self, path: Path) -> str:
        """The video's id; httpx.HTTPError or RuntimeError (the server's message) when it fails."""
        with path.open("rb") as file:
            response = self.http.post("/v1/videos", files={"file": (path.name, file)})
        if response.status_code != 200:
            raise RuntimeError(f"upload of {path}: {error_message(response)}")
        return response.json()["id"]

    def ask(self, model: str, video_id: str, prompt: str, frames: int, max_tokens: int) -> dict:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": video_id}},
                    {"type": "text", "text": prompt}]}],
                "media_io_kwargs": {"video": {"num_frames": frames}}}  # lmms-eval's spelling of the frame count
        response = self.http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(error_message(response))
        return response.json()


@dataclass
class EvalConfig:
    data: Path
    layout: str
    url: str = "http://127.0.0.1:8000"
    models: list[str] | None = None  # None: every model the server lists
    frames: int = 16
    max_tokens: int = 16
    limit: int | None = None
    concurrency: int = 4
    api_key: str | None = None
    out: Path | None = None


def choose_models(listed: list[Model], wanted: list[str] | None) -> list[Model]:
    if wanted is None:
        return listed
    by_name = {model.name: model for model in listed}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise EvalError(f"the server does not serve {', '.join(unknown)}; it serves {', '.join(by_name)}")
    return [by_name[name] for name in wanted]


def ask_one(server: Server, config: EvalConfig, model: Model, question: Question, video_id: str | Exception) -> Result:
    result = Result(model.name, question.id, question.task, str(question.video), question.answer)
    try:
        if isinstance(video_id, Exception):  # its upload failed: every question about it fails with that message
            raise video_id
        answer = server.ask(model.name, video_id, question.prompt, config.frames, config.max_tokens)
    except (httpx.HTTPError, RuntimeError) as err:
        result.error = str(err) or type(err).__name__
        return result
    report = answer.get("videollm") or {}
    result.text = answer["choices"][0]["message"]["content"] or ""
    result.pred, result.answered, result.correct = score(config.layout, question.answer, result.text)
    result.visual_tokens = report.get("visual_tokens")
    result.ttft_ms = (report.get("timings_ms") or {}).get("ttft")
    result.prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
    result.cache = report.get("cache")
    return result


def run(config: EvalConfig, progress=None) -> tuple[list[Model], list[Result]]:
    """Every question asked of every model; the dataset and the model names are checked first."""
    progress = progress or sys.stderr  # looked up now: a caller (pytest) may have replaced it
    questions = load_questions(config.data, config.layout, config.limit)
    if not questions:
        raise EvalError(f"{config.data}: no questions")
    server = Server(config.url, config.api_key)
    try:
        models = choose_models(server.models(), config.models)
        with ThreadPoolExecutor(config.concurrency) as pool:
            # each distinct file once; the questions then name it by id, so no video is sent twice
            videos = sorted({question.video for question in questions})
            ids: dict[Path, str | Exception] = dict(zip(videos, pool.map(lambda path: _upload(server, path), videos)))
            results = []
            for model in models:  # one model at a time, so each row's latencies are its own
                results += pool.map(lambda q: ask_one(server, config, model, q, ids[q.video]), questions)
                print(f"{model.name}: {len(questions)} questions asked", file=progress, flush=True)
    finally:
        server.close()
    return models, results


def _upload(server: Server, path: Path) -> str | Exception:
    try:
        return server.upload(path)
    except (httpx.HTTPError, RuntimeError) as err:
        return err


# ---------------------------------------------------------------------------------------------------------
# The report.

@dataclass
class Row:
    model: str
    compression: str
    full: bool
    questions: int
    answered: int
    correct: int
    failed: int
    accuracy: float | None
    vs_full: float | None = None
    ttft_p50_ms: float | None = None
    visual_tokens_mean: float | None = None
    prompt_tokens_mean: float | None = None
    per_task: dict[str, float | None] = field(default_factory=dict)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def accuracy(results: list[Result]) -> float | None:
    answered = [r for r in results if r.error is None and r.answered]
    return 100 * sum(r.correct for r in answered) / len(answered) if answered else None


def summarise(models: list[Model], results: list[Result]) -> list[Row]:
    """One row per model, the full-token model's first (the others are compared with it)."""
    ordered = sorted(models, key=lambda model: not model.full)  # stable: the server's order otherwise
    rows = []
    for model in ordered:
        mine = [r for r in results if r.model == model.name]
        ok = [r for r in mine if r.error is None]
        ttfts = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        by_task = defaultdict(list)
        for r in mine:
            by_task[r.task].append(r)
        rows.append(Row(model.name, model.describe(), model.full, len(mine), sum(r.answered for r in ok),
                        sum(r.correct for r in ok), len(mine) - len(ok), accuracy(mine),
                        ttft_p50_ms=statistics.median(ttfts) if ttfts else None,
                        visual_tokens_mean=_mean([r.visual_tokens for r in ok]),
                        prompt_tokens_mean=_mean([r.prompt_tokens for r in ok]),
                        per_task={task: accuracy(rs) for task, rs in sorted(by_task.items())}))
    full = next((row for row in rows if row.full), None)
    for row in rows:
        if full is not None and row.accuracy is not None and full.accuracy is not None:
            row.vs_full = row.accuracy - full.accuracy
    return rows


def _cell(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = ["---"] * len(header)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *lines])


def format_report(rows: list[Row]) -> str:
    header = ["model", "compression", "questions", "answered", "accuracy %", "vs full (pp)", "TTFT p50 ms",
              "visual tokens (mean)", "prompt tokens (mean)", "failed"]
    lines = [[f"{row.model} (full)" if row.full else row.model, row.compression, str(row.questions),
              str(row.answered), _cell(row.accuracy), "baseline" if row.full else _cell(row.vs_full, "+.1f"),
              _cell(row.ttft_p50_ms, ".0f"), _cell(row.visual_tokens_mean), _cell(row.prompt_tokens_mean),
              str(row.failed)] for row in rows]
    text = _table(header, lines)
    tasks = sorted({task for row in rows for task in row.per_task})
    if len(tasks) > 1:
        text += "\n\nAccuracy % per task\n\n" + _table(
            ["task", *(row.model for row in rows)],
            [[task, *(_cell(row.per_task.get(task)) for row in rows)] for task in tasks])
    return text


def main(config: EvalConfig, out=None, shown_errors: int = 5) -> int:
    """Run, print the tables (and the first few errors), write --out; 1 when every request failed."""
    out = out or sys.stdout
    models, results = run(config)
    rows = summarise(models, results)
    print(format_report(rows), file=out)
    failures = [r for r in results if r.error is not None]
    if failures:
        print(f"\n{len(failures)} of {len(results)} requests failed; the first:", file=out)
        for r in failures[:shown_errors]:
            print(f"  {r.model} {r.question}: {r.error}", file=out)
    if config.out is not None:
        document = {"data": str(config.data), "layout": config.layout, "url": config.url, "frames": config.frames,
                    "max_tokens": config.max_tokens, "limit": config.limit,
                    "models": [{"name": m.name, "compression": m.compression, "full": m.full} for m in models],
                    "summary": [asdict(row) for row in rows], "results": [asdict(r) for r in results]}
        config.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return 1 if len(failures) == len(results) else 0


def api_key_from_env(given: str | None) -> str | None:
    return given if given is not None else os.environ.get("VIDEOLLM_API_KEY") or None
