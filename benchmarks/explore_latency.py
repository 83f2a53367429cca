"""How fast the explorer answers a prompt: `POST /api/prompt` end to end over HTTP against a real
`kvedit explore` server (a subprocess, as a user starts it), on the bundled model by default.

    python benchmarks/explore_latency.py [--model smollm2-135m] [--prompts 10] [--repeats 3] [--threads N]

Prints the first prompt's time right after start-up (while the server still projects every layer's values in
the background), how long that projection takes, then every request's wall time once it is done: the median,
90th percentile and maximum, and the machine load before and after. The target is a median of at most 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TARGET_S = 1.0


def prompts(n: int) -> list[str]:
    """The first `n` rewrite prompts of the built-in demo facts (different lengths and relations)."""
    from kvedit.data.demo_facts import demo_requests

    requests = demo_requests()
    step = max(1, len(requests) // n)
    return [r.rewrite_prompt for r in requests[::step][:n]]


def page_headers(base: str) -> dict[str, str]:
    """What the explorer's own page sends with every POST: its Origin and the server's token (read from the page)."""
    page = urllib.request.urlopen(base + "/", timeout=30).read().decode()
    token = re.search(r'<meta name="kvedit-token" content="([^"]+)"', page)[1]
    return {"Origin": base, "X-Kvedit-Token": token}


def post(url: str, body: dict, headers: dict[str, str]) -> tuple[float, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        payload = json.loads(response.read())
    return time.perf_counter() - start, payload


def start_server(model: str | None, threads: int | None) -> tuple[subprocess.Popen, str]:
    """`kvedit explore --port 0` in a subprocess; returns it and its base URL once it answers."""
    script = Path(sys.executable).with_name("kvedit")
    cmd = [str(script), "explore", "--port", "0"] + (["--model", model] if model else [])
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = None
    deadline = time.monotonic() + 300
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvedit explore exited with {proc.wait()} before serving")
        print("  server:", line.rstrip())
        if " at http://" in line:
            url = line.split(" at ", 1)[1].strip().rstrip("/")
    if url is None:
        proc.kill()
        raise RuntimeError("kvedit explore did not start within 300 s")
    while True:
        try:
            urllib.request.urlopen(url + "/api/info", timeout=5).read()
            return proc, url
        except OSError:
            time.sleep(0.1)


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"median {statistics.median(times):.3f} s, p90 {p90:.3f} s, max {max(times):.3f} s, "
        f"min {min(times):.3f} s over {len(times)} requests"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=10, help="different prompts (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="times each prompt is asked (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    texts = prompts(args.prompts)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    started = time.perf_counter()
    proc, url = start_server(args.model, args.threads)
    try:
        headers = page_headers(url)
        first, _ = post(url + "/api/prompt", {"prompt": texts[0]}, headers)
        print(f"first prompt after start-up (value tokens still being projected in the background): {first:.3f} s")
        info = json.loads(urllib.request.urlopen(url + "/api/info").read())
        while info["value_tokens_ready"] < info["layers"]:
            time.sleep(0.5)
            info = json.loads(urllib.request.urlopen(url + "/api/info").read())
        print(f"value tokens of all {info['layers']} layers ready {time.perf_counter() - started:.1f} s after launch")
        times = []
        for r in range(args.repeats):
            for text in texts:
                elapsed, payload = post(url + "/api/prompt", {"prompt": text}, headers)
                times.append(elapsed)
                if r == 0:
                    top = payload["next_token"][0]
                    print(f"  {elapsed:6.3f} s  {text!r} → {top['token']!r} {top['prob']:.2f}")
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"HTTP POST /api/prompt, end to end: {describe(times)}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    median = statistics.median(times)
    print(f"target: median ≤ {TARGET_S:.1f} s → {'met' if median <= TARGET_S else 'NOT met'} ({median:.3f} s)")
    return 0 if median <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
