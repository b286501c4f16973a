"""serve.py under concurrent streaming clients, against Hugging Face's `transformers serve --continuous-batching`.

    python tests/bench.py serve --hf-python /path/to/venv/bin/python

Both servers get the same random GPT-2 124M weights (exported in the Hub's layout), run on this CPU,
and answer the same streamed /v1/completions requests: greedy, `--new-tokens` tokens each, from 1, 4
and 8 clients at once. Per server and number of clients: aggregate tokens/s (every client's tokens
over the wall time from the first request to the last answer's end) and the median time to first
token (a request's first text). transformers runs in a subprocess from a throwaway venv
(--hf-python), never imported here. Its continuous batching sizes its paged cache from GPU memory, so
on a CPU it needs the --cb-* sizes below or every request fails; and its GPT-2 tokenizer is built from
a `tokenizers` BPE object (a GPT2TokenizerFast made from vocab and merges files encodes every text
to no tokens under transformers 5).
"""
import argparse
import http.client
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import UserError
from load_gpt2 import export_hf
from model import GPT, get_config


REPO = Path(__file__).resolve().parent.parent.parent
HF_CB_FLAGS = ["--cb-block-size", "32", "--cb-num-blocks", "1024", "--cb-max-batch-tokens", "2048"]

# Run with the venv's Python: writes tokenizer.json (and its config) for GPT-2's BPE into the folder.
HF_TOKENIZER_SCRIPT = """
import sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
folder = sys.argv[1]
bpe = models.BPE.from_file(f"{folder}/vocab.json", f"{folder}/merges.txt")
tok = Tokenizer(bpe)
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                               unk_token="<|endoftext|>")
assert fast("Every effort moves you")["input_ids"] == [6109, 3626, 6100, 345], fast("Every effort moves you")
fast.save_pretrained(folder)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-python", default=None,
                        help="the Python of a venv with transformers[serving]; without it, serve.py alone")
    parser.add_argument("--clients", default="1,4,8", help="numbers of concurrent streaming clients")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1337)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> str:
    """Poll /v1/models until the server answers; the id of its model."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the server exited with {proc.returncode} before it answered")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError):
            time.sleep(1)
    raise UserError(f"the server on port {port} did not answer within {timeout:.0f} s")


def one_request(port: int, model: str, prompt: str, new_tokens: int, out: list, index: int) -> None:
    """One streamed greedy completion; out[index] = (seconds to first text, tokens, seconds to the end)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise UserError(f"a request got {response.status}: {response.read()[:300]!r}")
    first, pieces, usage = None, 0, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            pieces += 1
            first = first or time.perf_counter() - start
    conn.close()
    out[index] = (first, usage["completion_tokens"] if usage else pieces, time.perf_counter() - start)


def measure(port: int, model: str, clients: int, new_tokens: int) -> dict:
    out = [None] * clients
    threads = [threading.Thread(target=one_request, args=(port, model, f"Client {i} says: every effort moves you",
                                                          new_tokens, out, i)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    wall = time.perf_counter() - start
    if any(o is None for o in out):
        raise UserError("a client got no answer")
    tokens = sum(o[1] for o in out)
    return {"clients": clients, "tokens": tokens, "tokens/s": tokens / wall,
            "median TTFT s": statistics.median(o[0] for o in out if o[0] is not None)}


def bench_server(name: str, command: list[str], port: int, args: argparse.Namespace) -> list[dict]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        model = wait_ready(port, proc)
        measure(port, model, 1, 8)  # warm-up: the first forward passes allocate and pick kernels
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            rows.append({"server": name, **measure(port, model, clients, args.new_tokens)})
            print(rows[-1], file=sys.stderr, flush=True)
        return rows
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-random"
        torch.manual_seed(args.seed)
        export_hf(GPT(get_config("gpt2")), folder)  # with GPT-2's vocab.json and merges.txt beside it
        port = free_port()
        rows = bench_server("serve.py", [sys.executable, str(REPO / "serve.py"), "--init", str(folder),
                                         "--port", str(port), "--max-batch", "8"], port, args)
        if args.hf_python:
            subprocess.run([args.hf_python, "-c", HF_TOKENIZER_SCRIPT, str(folder)], check=True, timeout=300)
            port = free_port()
            cli = str(Path(args.hf_python).parent / "transformers")
            rows += bench_server("transformers serve", [cli, "serve", str(folder), "--continuous-batching",
                                                        *HF_CB_FLAGS, "--device", "cpu", "--host", "127.0.0.1",
                                                        "--port", str(port)], port, args)
    one = {r["server"]: r["tokens/s"] for r in rows if r["clients"] == 1}
    for row in rows:
        row["x one client"] = row["tokens/s"] / one[row["server"]] if row["server"] in one else float("nan")
    return rows
