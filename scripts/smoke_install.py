"""A user's first minutes, on a plain `pip install .`: run with that environment's interpreter from
outside the checkout (scripts/check_install.sh does both).

Starts the installed `videollm serve` (which builds the embedded model on first use), uploads a
clip, asks about it twice over REST (streamed, then not), checks the answers and the cache hit,
runs `videollm bench --help`, and stops the stack with Ctrl-C. Only the standard library and the
installed package are used here, so a runtime dependency missing from pyproject.toml fails it.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from bench.video import benchmark_clip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers={"content-type": content_type})
    with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, dict(response.headers), response.read()


def upload(base: str, video: bytes) -> str:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"clip.mp4\"\r\n"
            f"content-type: video/mp4\r\n\r\n").encode() + video + f"\r\n--{boundary}--\r\n".encode()
    status, _, reply = post(f"{base}/v1/videos", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200, reply
    return json.loads(reply)["id"]


def ask(base: str, video_id: str, stream: bool) -> tuple[str, dict, str]:
    body = {"model": "videollm", "max_tokens": 8, "stream": stream, "videollm": {"num_frames": 8},
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_id}},
                                                      {"type": "text", "text": "What happens in this video?"}]}]}
    status, headers, reply = post(f"{base}/v1/chat/completions", json.dumps(body).encode(), "application/json")
    assert status == 200, reply
    if not stream:
        answer = json.loads(reply)
        return answer["choices"][0]["message"]["content"], answer["videollm"], headers["x-videollm-cache"]
    events = [json.loads(line[6:]) for line in reply.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    return text, events[-1]["videollm"], headers["x-videollm-cache"]


def main() -> int:
    videollm = shutil.which("videollm", path=str(Path(sys.executable).parent))
    assert videollm, f"no videollm command beside {sys.executable}: install the project first"
    subprocess.run([videollm, "bench", "--help"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    cache = tempfile.mkdtemp(prefix="videollm-smoke-")
    process = subprocess.Popen([videollm, "--log-level", "WARNING", "serve", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "XDG_CACHE_HOME": cache})
    output = []
    try:
        deadline = time.monotonic() + 600
        while not any("serving on" in line for line in output):
            line = process.stdout.readline()
            if (not line and process.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit("videollm serve did not start:\n" + "".join(output))
            output.append(line)
        base = f"http://127.0.0.1:{port}"
        video_id = upload(base, benchmark_clip())
        text, report, cache_state = ask(base, video_id, stream=True)
        assert text and cache_state == "miss" and report["frames"] == 8, (text, report)
        text, report, cache_state = ask(base, video_id, stream=False)
        assert text and cache_state == "hit", (text, cache_state)
        for page in ("/demo/", "/demo/demo.js", "/demo/demo.css"):  # the demo page's files ship in the package
            with urllib.request.urlopen(base + page, timeout=30) as response:
                assert response.status == 200 and response.read(), page
        print(f"smoke: installed videollm serve answered {len(text)} characters; the repeat was a cache hit; "
              "the demo page is served")
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(60)
        output += process.stdout.readlines()
        shutil.rmtree(cache, ignore_errors=True)
    if code != 0:
        print("".join(output), file=sys.stderr)
        raise SystemExit(f"videollm serve exited with {code} after Ctrl-C")
    return 0


if __name__ == "__main__":
    sys.exit(main())
