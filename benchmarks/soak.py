"""Soak: thousands of mixed requests against one `vllm serve`, with faults and KV pressure.

    python benchmarks/soak.py                          # the full soak: 2,000 requests, 32 at once
    python benchmarks/soak.py --requests 300           # the short soak CI runs (tests/test_soak.py)
    python benchmarks/soak.py --url http://127.0.0.1:8000 --model NAME   # an existing server

Without `--url` it starts `vllm serve` on a tiny Dream checkpoint it writes (random weights,
`--attention-backend focus`), with a KV cache smaller than what 32 requests in flight need, so
requests queue for cache (the scheduler admits a request only when its prompt and whole
canvas fit, and never preempts). Traffic goes to localhost only.

The mix, drawn from a fixed seed: a pool of request specs (prompts of ~10 to ~800 tokens,
max_tokens 8-64, temperature 0 or 0.7 with a seed, diffusion settings varied per request —
cache `dual` / `prefix`, threshold decoding, block length 8, refresh `prefill`, and Focus on or
off through `min_prompt_len`; completions and chat), each sent streaming or not. Faults: some
clients drop the connection after the first streamed chunk, some give up on a plain request
after a short timeout (both abort the request in the engine mid-block).

Checked and reported (results JSON: `benchmarks/results/soak.json` by default):
- every request that was not deliberately cut completes, with exactly the text its spec gets
  when run alone on the idle server first (`mismatches`, target 0);
- `errors` (an HTTP error or exception on a request that was not cut; target 0) and `lost`
  (a request that never finished; target 0);
- when the load is over: `vllm:num_requests_running` / `waiting` 0 and the KV cache usage 0
  (no block left allocated), from `/metrics`;
- p50 / p99 latency, requests/s and output tokens/s; the peak number of requests waiting for
  cache; the resident memory of the server's processes at idle before the load and after each
  quarter of it (the load runs in four parts, each draining to idle), to tell a leak (growth
  every quarter) from allocators keeping their high-water mark (growth once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SERVER_DEFAULTS = {"gen_length": 64, "block_length": 16, "dense_layers": 1, "num_sinks": 4}
SERVER_DEFAULTS |= {"prompt_block_size": 16, "min_keep_tokens": 16, "min_prompt_len": 32}
MAX_MODEL_LEN = 1024
# What 32 requests in flight would need is ~4-5x this (CPU KV blocks hold 128 positions).
KV_CACHE_BYTES = 3 << 20
SETTINGS = [
    {},
    {"cache": "prefix"},
    {"threshold": 0.5},
    {"block_length": 8},
    {"refresh": "prefill"},
    {"min_prompt_len": 100_000},  # dense attention (Focus off) for this request
]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@dataclass(frozen=True)
class Spec:
    """One kind of request: its prompt, options and settings."""

    index: int
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None
    settings: dict
    chat: bool

    def body(self, model: str, stream: bool) -> dict:
        body = {"model": model, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.settings:
            body["vllm_xargs"] = self.settings
        if stream:
            body["stream"] = True
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def make_specs(count: int, rng: random.Random) -> list[Spec]:
    specs = []
    for index in range(count):
        words = rng.choice([2, 8, 25, 60, 150])  # ~5 tokens a word: ~10 to ~800 tokens
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        sampled = rng.random() < 0.25
        specs.append(
            Spec(
                index=index,
                prompt=prompt,
                max_tokens=rng.choice([8, 16, 32, 64]),
                temperature=0.7 if sampled else 0.0,
                seed=rng.randrange(1 << 20) if sampled else None,
                settings=rng.choice(SETTINGS),
                chat=rng.random() < 0.15,
            )
        )
    return specs


@dataclass
class Outcome:
    spec: int
    kind: str  # "plain", "stream", "disconnect" (after the first chunk), "timeout" (gave up)
    ok: bool = False
    text: str = ""
    tokens: int = 0
    latency_s: float = 0.0
    error: str = ""
    cut: bool = False  # the client cut it on purpose


def _text_of(choice: dict, chat: bool, stream: bool) -> str:
    if chat:
        part = choice.get("delta" if stream else "message") or {}
        return part.get("content") or ""
    return choice.get("text") or ""


async def send(client, base: str, model: str, spec: Spec, kind: str, timeout_s: float) -> Outcome:
    """One request; `kind` "timeout" gives up after `timeout_s` (then short), others wait."""
    import httpx

    outcome = Outcome(spec.index, kind)
    started = time.perf_counter()
    stream = kind in ("stream", "disconnect")
    body = spec.body(model, stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    try:
        if not stream:
            response = await client.post(base + spec.path, json=body, timeout=timeout_s)
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return outcome
            data = response.json()
            outcome.text = _text_of(data["choices"][0], spec.chat, False)
            outcome.tokens = data["usage"]["completion_tokens"]
        else:
            async with client.stream(
                "POST", base + spec.path, json=body, timeout=timeout_s
            ) as response:
                if response.status_code != 200:
                    outcome.error = f"HTTP {response.status_code}: {await response.aread()}"
                    return outcome
                pieces = []
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        outcome.tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):
                        pieces.append(_text_of(chunk["choices"][0], spec.chat, True))
                        if kind == "disconnect":
                            outcome.cut = True
                            return outcome  # leaving the block closes the connection
                outcome.text = "".join(pieces)
        outcome.ok = True
    except httpx.TimeoutException:
        if kind == "timeout":
            outcome.cut = True
        else:
            outcome.error = "client timeout"
    except Exception as err:  # noqa: BLE001 - every failure is reported, none is fatal
        outcome.error = f"{type(err).__name__}: {err}"
    finally:
        outcome.latency_s = time.perf_counter() - started
    return outcome


def scrape(base: str) -> dict[str, float]:
    """Unlabelled view of the vLLM and vllm-focus samples (summed over label sets)."""
    from vllm_focus.testing.server import metric_samples

    values: dict[str, float] = {}
    for name, _, value in metric_samples(base):
        if name.startswith(("vllm:", "vllm_focus:")):
            values[name] = values.get(name, 0.0) + value
    return values


def server_rss_mb(pid: int) -> dict[str, float]:
    """Resident MiB of the server's processes: the API server (`pid`), its children (the
    engine core, vLLM's helpers) and the total."""
    import psutil

    root = psutil.Process(pid)
    sizes = {"api_server": root.memory_info().rss / 2**20, "children": 0.0}
    for process in root.children(recursive=True):
        try:
            sizes["children"] += process.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    sizes["total"] = sizes["api_server"] + sizes["children"]
    return {k: round(v, 1) for k, v in sizes.items()}


async def wait_idle(base: str, timeout_s: float = 120) -> dict[str, float]:
    deadline, values = time.time() + timeout_s, {}
    while time.time() < deadline:
        values = scrape(base)
        busy = values.get("vllm:num_requests_running", 0) + values.get(
            "vllm:num_requests_waiting", 0
        )
        if busy == 0 and values.get("vllm:kv_cache_usage_perc", 0) == 0:
            break
        await asyncio.sleep(0.5)
    return values


@dataclass
class Report:
    requests: int
    concurrency: int
    specs: int
    completed: int
    cut_on_purpose: int
    errors: int
    lost: int
    mismatches: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    peak_waiting: float
    peak_running: float
    idle_running: float
    idle_waiting: float
    idle_kv_cache_usage: float
    # Server memory at idle: after the solo runs, then after each quarter of the load.
    rss_idle_mb: list = field(default_factory=list)
    kinds: dict = field(default_factory=dict)
    error_samples: list = field(default_factory=list)
    diffusion_metrics: dict = field(default_factory=dict)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def soak(
    base: str,
    model: str,
    requests: int,
    concurrency: int,
    num_specs: int,
    seed: int,
    server_pid: int | None = None,
    timeout_s: float = 600,
) -> Report:
    import httpx
    from tqdm import tqdm

    rng = random.Random(seed)
    specs = make_specs(num_specs, rng)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        # Each spec alone on the idle server: the text every later copy must reproduce.
        alone: dict[int, str] = {}
        for spec in tqdm(specs, desc="solo runs", leave=False):
            outcome = await send(client, base, model, spec, "plain", timeout_s)
            if not outcome.ok:
                raise RuntimeError(f"solo run of spec {spec.index} failed: {outcome.error}")
            alone[spec.index] = outcome.text
        await wait_idle(base)
        rss = [server_rss_mb(server_pid)] if server_pid else []

        plan = []
        for _ in range(requests):
            roll = rng.random()
            kind = "plain" if roll < 0.5 else "stream" if roll < 0.9 else None
            kind = kind or ("disconnect" if roll < 0.95 else "timeout")
            patience = 0.05 + 0.3 * rng.random() if kind == "timeout" else timeout_s
            plan.append((rng.choice(specs), kind, patience))
        queue: asyncio.Queue = asyncio.Queue()
        outcomes: list[Outcome] = []
        peaks = {"waiting": 0.0, "running": 0.0}
        progress = tqdm(total=requests, desc="soak requests")

        async def worker() -> None:
            while True:
                try:
                    spec, kind, patience = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                outcomes.append(await send(client, base, model, spec, kind, patience))
                progress.update(1)

        async def watch(stop: asyncio.Event) -> None:
            while not stop.is_set():
                values = await asyncio.to_thread(scrape, base)
                peaks["waiting"] = max(peaks["waiting"], values.get("vllm:num_requests_waiting", 0))
                peaks["running"] = max(peaks["running"], values.get("vllm:num_requests_running", 0))
                await asyncio.sleep(0.5)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        wall = 0.0
        for quarter in range(4):
            for item in plan[quarter * requests // 4 : (quarter + 1) * requests // 4]:
                queue.put_nowait(item)
            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            wall += time.perf_counter() - started
            idle = await wait_idle(base)
            if server_pid:
                rss.append(server_rss_mb(server_pid))
        stop.set()
        await watcher
        progress.close()

    done = [o for o in outcomes if o.ok]
    errors = [o for o in outcomes if not o.ok and not o.cut]
    # Never answered: the client waited its whole timeout, or the request never came back.
    lost = sum(o.error == "client timeout" for o in errors) + requests - len(outcomes)
    mismatches = [o for o in done if o.text != alone[o.spec]]
    kinds: dict[str, int] = {}
    for _, kind, _ in plan:
        kinds[kind] = kinds.get(kind, 0) + 1
    latencies = [o.latency_s for o in done]
    return Report(
        requests=requests,
        concurrency=concurrency,
        specs=num_specs,
        completed=len(done),
        cut_on_purpose=sum(o.cut for o in outcomes),
        errors=len(errors),
        lost=lost,
        mismatches=len(mismatches),
        wall_s=wall,
        requests_per_s=len(done) / wall,
        output_tokens_per_s=sum(o.tokens for o in done) / wall,
        latency_p50_s=_percentile(latencies, 0.5),
        latency_p99_s=_percentile(latencies, 0.99),
        peak_waiting=peaks["waiting"],
        peak_running=peaks["running"],
        idle_running=idle.get("vllm:num_requests_running", -1),
        idle_waiting=idle.get("vllm:num_requests_waiting", -1),
        idle_kv_cache_usage=idle.get("vllm:kv_cache_usage_perc", -1),
        rss_idle_mb=rss,
        kinds=kinds,
        error_samples=[o.error for o in errors[:5]]
        + [f"spec {o.spec}: {o.text!r} != {alone[o.spec]!r}" for o in mismatches[:5]],
        diffusion_metrics={k: v for k, v in idle.items() if k.startswith("vllm_focus:")},
    )


def serve_tiny(workdir: Path):
    """Write the tiny Dream checkpoint and start `vllm serve` on it (Focus backend)."""
    from vllm_focus.testing import server as serving
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(workdir / "dream", "dream")
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--attention-backend", "focus"]
    # The smallest token budget allowed (one whole refresh): refreshes of requests that reach a
    # block start together are staggered over engine steps.
    args += ["--max-num-seqs", "64", "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
    server = serving.start(
        str(model_dir),
        *args,
        log_path=str(workdir / "serve.log"),
        additional={"focus_dllm": SERVER_DEFAULTS},
    )
    serving.wait_healthy(server)
    return server, str(model_dir)


def run(
    requests: int,
    concurrency: int,
    num_specs: int,
    seed: int,
    url: str | None = None,
    model: str | None = None,
) -> Report:
    if url:
        return asyncio.run(soak(url, model, requests, concurrency, num_specs, seed))
    with tempfile.TemporaryDirectory(prefix="vllm-focus-soak-") as workdir:
        server, model_dir = serve_tiny(Path(workdir))
        try:
            report = asyncio.run(
                soak(
                    server.base,
                    model_dir,
                    requests,
                    concurrency,
                    num_specs,
                    seed,
                    server_pid=server.process.pid,
                )
            )
        finally:
            server.stop()
        if server.process.returncode not in (0, -15):
            raise RuntimeError(f"vllm serve exited with {server.process.returncode}")
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--specs", type=int, default=48, help="distinct request specs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--model", help="the served model name, with --url")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    started = time.time()
    report = run(args.requests, args.concurrency, args.specs, args.seed, args.url, args.model)
    result = {"command": "python benchmarks/soak.py", "args": vars(args) | {"out": str(args.out)}}
    result |= {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started))}
    result["report"] = asdict(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
