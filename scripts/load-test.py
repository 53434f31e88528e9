#!/usr/bin/env python3
"""A bounded load test of an OpenAI-compatible server (zagreus serve, llama-server): CLIENTS
clients each send REQUESTS streamed /v1/completions requests, one after the other, and the figures
are requests per second, latency and time to first token (p50/p99), and generated tokens per
second. Loopback only; every request has a fixed number of tokens (ignore_eos) and the whole run
a time limit. Standard library only.

Usage: load-test.py URL [--clients N] [--requests M] [--max-tokens T] [--prompt-words W]
                        [--limit SECS] [--json]
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def one_request(host, port, body, limit):
    """Sends one streamed request; returns (latency, ttft, tokens)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=limit)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    ttft, pieces, usage = None, 0, None
    for raw in resp:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        if chunk.get("usage"):
            usage = chunk["usage"].get("completion_tokens")
        for c in chunk.get("choices", []):
            if c.get("text"):
                pieces += 1
                if ttft is None:
                    ttft = time.monotonic() - t0
    conn.close()
    return time.monotonic() - t0, ttft if ttft is not None else float("nan"), usage if usage is not None else pieces


def percentile(xs, p):
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--limit", type=float, default=600, help="seconds for the whole run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load-test: loopback servers only")
    results, errors, lock = [], [], threading.Lock()
    deadline = time.monotonic() + a.limit
    # Wait for the model to load (/health answers 503 until then).
    while True:
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("load-test: the server never got ready")
        time.sleep(0.2)

    def client(i):
        for j in range(a.requests):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # A different prompt per request: no request is helped by another's cached prefix.
            words = " ".join(f"w{(i * 7919 + j * 104729 + k) % 9973}" for k in range(a.prompt_words))
            body = {"prompt": f"Request {i}.{j}: {words}", "max_tokens": a.max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                r = one_request(u.hostname, u.port, body, left)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    errors.append(str(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    lat = [r[0] for r in results]
    ttft = [r[1] for r in results]
    out = {
        "clients": a.clients,
        "requests": len(results),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(results) / wall, 3),
        "latency_p50_s": round(percentile(lat, 50), 3),
        "latency_p99_s": round(percentile(lat, 99), 3),
        "ttft_p50_s": round(percentile(ttft, 50), 3),
        "ttft_p99_s": round(percentile(ttft, 99), 3),
        "generated_tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
    }
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
    if errors:
        print(f"load-test: {len(errors)} requests failed, first: {errors[0]}", file=sys.stderr)
        sys.exit(1)
    if len(results) < a.clients * a.requests:
        print("load-test: the time limit ended the run early", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
