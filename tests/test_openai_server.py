"""`vllm serve <tiny dream dir> --attention-backend focus`, driven by the openai client.

One server for the module, no flags beyond sizing, the backend and server-wide diffusion
defaults (Focus knobs that make its short prompts sparse: one dense layer of two, one kept
prompt block of 4 tokens, 2 sinks). Checks tokens against the reference decoder, streaming by
committed blocks, chat through the checkpoint's template, usage and finish reasons; the
bad-input battery (every kind of bad setting or unsupported option is an HTTP 400 naming the
field, while concurrent good requests complete with the tokens they get alone); edge inputs
that have a correct answer (special-token prompts, max_tokens above the canvas cap, n > 1
with a seed, stop strings inside a block); the startup log line; and the diffusion metrics
on `/metrics`.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vllm_focus.reference.decode import finish, generate
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings
from vllm_focus.testing import server as serving

SERVER_DEFAULTS = {
    "gen_length": 64,
    "block_length": 16,
    "min_prompt_len": 8,
    "dense_layers": 1,
    "prompt_block_size": 4,
    "min_keep_tokens": 4,
    "num_sinks": 2,
}
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    model_dir = tiny_dirs["dream"]
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    args = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN)]
    args += ["--kv-cache-memory-bytes", str(8 << 20), "--attention-backend", "focus"]
    process = serving.start(
        model_dir, *args, log_path=str(log_path), additional={"focus_dllm": SERVER_DEFAULTS}
    )
    try:
        serving.wait_healthy(process)
        yield process.base, model_dir, str(log_path)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base, _, _ = server
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(server):
    _, model_dir, _ = server
    return ReferenceModel(model_dir)


def _expected(reference, prompt_ids, max_tokens, **overrides):
    model, eos = reference, reference.eos_token_ids
    settings = DiffusionSettings(**{**SERVER_DEFAULTS, **overrides})
    plan = settings.plan("dream", max_tokens, focus=True)
    return finish(generate(model, [prompt_ids], plan)[0], eos, max_tokens)


PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps."


def test_completion_matches_reference(client, server, reference):
    _, model_dir, _ = server
    response = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    prompt_ids, token_ids = choice.prompt_token_ids, choice.token_ids
    want, reason = _expected(reference, prompt_ids, 40)
    assert token_ids == want
    assert choice.finish_reason == reason
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(token_ids)


def test_per_request_settings_through_vllm_xargs(client, server, reference):
    _, model_dir, _ = server
    xargs = {"cache": "prefix", "block_length": 8, "threshold": 0.5, "window": 2, "num_sinks": 0}
    response = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True, "vllm_xargs": xargs},
    )
    choice = response.choices[0]
    assert choice.token_ids == _expected(reference, choice.prompt_token_ids, 24, **xargs)[0]


@pytest.mark.parametrize(
    "xargs, max_tokens",
    [
        ({"method": "sparse_dllm", "sparse_dllm_keep_ratio": 0.25}, 48),
        # no cache, the pattern fixed after the first fifth of the steps
        (
            {"method": "sparsed", "cache": "none", "sparsed_select": 0.2, "sparsed_block_size": 8},
            32,
        ),
    ],
    ids=["sparse_dllm", "sparsed"],
)
def test_method_through_vllm_xargs(client, server, reference, xargs, max_tokens):
    """A per-request method on the Focus server, as the reference decodes it."""
    _, model_dir, _ = server
    response = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, "vllm_xargs": xargs},
    )
    choice = response.choices[0]
    want = _expected(reference, choice.prompt_token_ids, max_tokens, **xargs)[0]
    assert choice.token_ids == want


def test_streaming_delivers_committed_blocks(client, server):
    _, model_dir, _ = server
    kwargs = dict(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=64,
        temperature=0,
        extra_body={"vllm_xargs": {"block_length": 16}},
    )
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    deltas = [c for c in chunks if c.choices and c.choices[0].text]
    # 64 tokens in blocks of 16 arrive as up to 4 pieces (fewer if EOS ends the output).
    assert 1 <= len(deltas) <= 4
    if whole.finish_reason == "length":
        assert len(deltas) == 4


def test_chat_uses_the_template_and_reports_usage(client, server, reference):
    _, model_dir, _ = server
    response = client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": "Hello, how are you today?"}],
        max_tokens=32,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    prompt_ids = response.prompt_token_ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, how are you today?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
    want, reason = _expected(reference, prompt_ids, 32)
    assert choice.token_ids == want
    assert choice.finish_reason == reason
    assert response.usage.completion_tokens == len(want)


BAD_REQUESTS = [
    # Diffusion / Focus settings (vllm_xargs): out of range, wrong type, unknown name.
    ({"extra_body": {"vllm_xargs": {"block_length": 0}}}, "block_length"),
    ({"extra_body": {"vllm_xargs": {"block_length": "8"}}}, "block_length"),
    ({"extra_body": {"vllm_xargs": {"block_length": 8.5}}}, "block_length"),
    ({"extra_body": {"vllm_xargs": {"gen_length": 0}}}, "gen_length"),
    ({"extra_body": {"vllm_xargs": {"steps": 7}}}, "steps"),
    ({"extra_body": {"vllm_xargs": {"steps": None}}}, "vllm_xargs.steps"),
    ({"extra_body": {"vllm_xargs": {"threshold": 2}}}, "threshold"),
    ({"extra_body": {"vllm_xargs": {"confidence": "loudest"}}}, "confidence"),
    ({"extra_body": {"vllm_xargs": {"schedule": "fast"}}}, "schedule"),
    ({"extra_body": {"vllm_xargs": {"cache": "full"}}}, "cache"),
    ({"extra_body": {"vllm_xargs": {"refresh": "never"}}}, "refresh"),
    ({"extra_body": {"vllm_xargs": {"window": -1}}}, "window"),
    ({"extra_body": {"vllm_xargs": {"dense_layers": 0}}}, "dense_layers"),
    ({"extra_body": {"vllm_xargs": {"num_sinks": -1}}}, "num_sinks"),
    ({"extra_body": {"vllm_xargs": {"prompt_block_size": 0}}}, "prompt_block_size"),
    ({"extra_body": {"vllm_xargs": {"keep_ratio": 0}}}, "keep_ratio"),
    ({"extra_body": {"vllm_xargs": {"keep_ratio": 1.5}}}, "keep_ratio"),
    ({"extra_body": {"vllm_xargs": {"min_keep_tokens": -1}}}, "min_keep_tokens"),
    ({"extra_body": {"vllm_xargs": {"min_prompt_len": "long"}}}, "min_prompt_len"),
    ({"extra_body": {"vllm_xargs": {"blocksize": 8}}}, "blocksize"),
    # Methods: unknown, a combination that makes no sense, their knobs.
    ({"extra_body": {"vllm_xargs": {"method": "quest"}}}, "method"),
    ({"extra_body": {"vllm_xargs": {"method": "sparse_dllm", "cache": "prefix"}}}, "cache"),
    ({"extra_body": {"vllm_xargs": {"method": "sparse_dllm", "refresh": "prefill"}}}, "refresh"),
    ({"extra_body": {"vllm_xargs": {"sparse_dllm_kernel": 4}}}, "sparse_dllm_kernel"),
    ({"extra_body": {"vllm_xargs": {"sparse_dllm_keep_ratio": 0}}}, "sparse_dllm_keep_ratio"),
    ({"extra_body": {"vllm_xargs": {"method": "sparsed"}}}, "cache"),  # SparseD keeps no cache
    ({"extra_body": {"vllm_xargs": {"sparsed_skip": 1.5}}}, "sparsed_skip"),
    ({"extra_body": {"vllm_xargs": {"sparsed_select": 1}}}, "sparsed_select"),
    ({"extra_body": {"vllm_xargs": {"sparsed_block_size": 0}}}, "sparsed_block_size"),
    # max_tokens.
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"),
    # Prompts.
    ({"prompt": ""}, "prompt"),
    ({"prompt": [5, 6, "MASK", 7]}, "mask token"),
    ({"prompt": [5] * (MAX_MODEL_LEN + 1)}, "maximum context length"),
    ({"prompt": [5] * (MAX_MODEL_LEN - 40)}, "generation canvas"),
    # Options of vLLM's sampler that masked diffusion does not apply.
    ({"n": 2}, "n must be 1"),
    ({"temperature": -1}, "temperature"),
    ({"logprobs": 2}, "logprobs"),
    ({"extra_body": {"prompt_logprobs": 1}}, "prompt_logprobs"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "object"}}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "[a-z]+"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}}, "structured_outputs"),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, "structured_outputs"),
    ({"extra_body": {"min_tokens": 4}}, "min_tokens"),
    # (at temperature 0 vLLM itself resets these three: greedy decoding ignores them)
    ({"temperature": 0.7, "top_p": 0.5}, "top_p"),
    ({"temperature": 0.7, "extra_body": {"top_k": 5}}, "top_k"),
    ({"temperature": 0.7, "extra_body": {"min_p": 0.1}}, "min_p"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"extra_body": {"bad_words": ["the"]}}, "bad_words"),
    ({"extra_body": {"allowed_token_ids": [5, 6]}}, "allowed_token_ids"),
]


def test_bad_requests_get_400_while_good_ones_complete(client, server):
    """Every bad request is a 400 naming the field; good requests running all the while get
    exactly the tokens they get alone, and the server keeps serving."""
    import openai

    _, model_dir, _ = server
    mask_id = json.loads((Path(model_dir) / "config.json").read_text())["mask_token_id"]
    good = dict(model=model_dir, prompt=PROMPT, max_tokens=64, temperature=0)
    alone = client.completions.create(**good).choices[0].text
    texts: list[str] = []
    done = threading.Event()

    def run_good() -> None:
        while not done.is_set() or not texts:
            texts.append(client.completions.create(**good).choices[0].text)

    thread = threading.Thread(target=run_good)
    thread.start()
    try:
        for overrides, field in BAD_REQUESTS:
            request = {**good, **overrides}
            if isinstance(request["prompt"], list):
                request["prompt"] = [mask_id if t == "MASK" else t for t in request["prompt"]]
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(**request)
            assert field in str(info.value), (overrides, str(info.value))
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.chat.completions.create(
                model=model_dir,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                logprobs=True,
                top_logprobs=2,
            )
    finally:
        done.set()
        thread.join(timeout=300)
    assert texts and all(text == alone for text in texts)
    assert client.completions.create(**good).choices[0].text == alone


def test_edge_inputs_get_correct_answers(client, server, reference):
    _, model_dir, _ = server
    config = json.loads((Path(model_dir) / "config.json").read_text())
    ids = {"return_token_ids": True}
    # A prompt of special tokens only.
    specials = [config["bos_token_id"], config["bos_token_id"]]
    choice = client.completions.create(
        model=model_dir, prompt=specials, max_tokens=16, temperature=0, extra_body=ids
    ).choices[0]
    assert (choice.token_ids, choice.finish_reason) == _expected(reference, specials, 16)
    # max_tokens above the canvas cap (gen_length 64): the capped canvas, finish "length".
    choice = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=200,
        temperature=0,
        extra_body={**ids, "ignore_eos": True},
    ).choices[0]
    assert len(choice.token_ids) == 64 and choice.finish_reason == "length"
    plain = dict(model=model_dir, prompt=PROMPT, max_tokens=32, temperature=0)
    text = client.completions.create(**plain).choices[0].text
    # best_of is not an option vLLM's OpenAI server has: ignored, as it is for any model.
    assert client.completions.create(**plain, extra_body={"best_of": 2}).choices[0].text == text
    assert client.completions.create(**plain, echo=True).choices[0].text == PROMPT + text


def test_n_samples_with_a_seed_equal_solo_runs(client, server):
    """vLLM gives the i-th of n samples seed + i; each equals that seed's solo run."""
    _, model_dir, _ = server
    request = dict(model=model_dir, prompt=PROMPT, max_tokens=32, temperature=0.8)
    ids = {"return_token_ids": True}
    both = client.completions.create(**request, n=2, seed=11, extra_body=ids).choices
    solo = [
        client.completions.create(**request, seed=seed, extra_body=ids).choices[0].token_ids
        for seed in (11, 12)
    ]
    assert sorted(c.token_ids for c in both) == sorted(solo)
    assert solo[0] != solo[1]


def _stop_string(text: str, start: int) -> str:
    """Two printable ASCII characters of `text` from `start` on, not earlier in the text."""
    for i in range(start, len(text) - 1):
        piece = text[i : i + 2]
        if piece.isascii() and piece.isprintable() and text.find(piece) == i:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_inside_a_block(client, server, stream):
    """A stop string in the middle of a committed block cuts the text there, finish "stop"."""
    _, model_dir, _ = server
    request = dict(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=64,
        temperature=0,
        extra_body={"vllm_xargs": {"block_length": 16}, "ignore_eos": True},
    )
    whole = client.completions.create(**request).choices[0].text
    stop = _stop_string(whole, len(whole) // 3)
    if stream:
        chunks = list(client.completions.create(**request, stop=[stop], stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        choice = client.completions.create(**request, stop=[stop]).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == whole[: whole.find(stop)]
    assert reason == "stop"


def test_startup_log_states_the_settings(server):
    _, _, log_path = server
    log = Path(log_path).read_text()
    line = next(x for x in log.splitlines() if "vllm-focus: serving DreamModel" in x)
    assert "attention: Focus (FOCUS backend)" in line
    assert "block_length=16" in line and "dense_layers=1" in line and "num_sinks=2" in line
    assert f"RoPE base 10000, maximum length {MAX_MODEL_LEN} (the config allows 8192)" in line


def _scrape(base: str, model: str, prefix: str = "vllm_focus") -> dict[str, float]:
    """`prefix:` samples of `model` on /metrics, keyed `name` or `name{label=value}` by
    the labels other than model_name and engine."""
    values: dict[str, float] = {}
    for name, labels, value in serving.metric_samples(base):
        if not name.startswith(prefix + ":"):
            continue
        pairs = dict(labels)
        if pairs.pop("model_name", None) != model or pairs.pop("engine", None) != "0":
            continue
        extra = ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items()))
        key = name.removeprefix(prefix + ":")
        values[f"{key}{{{extra}}}" if extra else key] = value
    return values


def _scrape_when_idle(base: str, model: str, timeout: float = 60) -> dict[str, float]:
    """Scrape once no request runs (an earlier test's aborted stream may still be winding
    down in the engine) and the diffusion metrics have settled."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        running = _scrape(base, model, "vllm").get("num_requests_running", 0)
        current = _scrape(base, model)
        if running == 0 and current == last:
            return current
        last = current
        time.sleep(0.6)  # longer than the engine's snapshot interval
    raise TimeoutError("the server did not become idle")


def test_metrics_count_steps_blocks_and_focus_share(client, server):
    """One request of 2 blocks x 16 steps: its steps, commits, phases and Focus share show up
    on /metrics (no other request runs meanwhile)."""
    base, model_dir, _ = server
    before = _scrape_when_idle(base, model_dir)
    choice = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=32,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    ).choices[0]
    after = _scrape(base, model_dir)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    prompt_len = len(choice.prompt_token_ids)
    layers = 2
    assert len(choice.token_ids) == 32
    assert delta("denoising_steps_total") == 32
    assert delta("block_commits_total") == 2
    assert delta("committed_tokens_total") == 32
    assert delta('engine_steps_total{phase="refresh"}') == 2
    assert delta('engine_steps_total{phase="block"}') == 30
    assert delta('model_seconds_total{phase="refresh"}') > 0
    assert delta('model_seconds_total{phase="block"}') > 0
    # Focus runs on the 15 later steps of each block: one dense layer reads the whole prompt,
    # the sparse one its kept block (4 tokens) and 2 sinks, at least one key.
    assert delta("focus_steps_total") == 30
    assert delta("focus_prompt_keys_total") == 30 * layers * prompt_len
    attended = delta("focus_prompt_keys_attended_total")
    assert 30 * (prompt_len + 1) <= attended <= 30 * (prompt_len + 6)
    assert delta("request_block_commits_count") == 1
    assert delta("request_block_commits_sum") == 2
    assert delta('request_block_commits_bucket{le="2"}') == 1
    assert delta('request_block_commits_bucket{le="1"}') == 0
    assert delta("request_denoising_steps_per_token_sum") == 1.0
    assert delta("request_focus_prompt_share_count") == 1
    share = delta("request_focus_prompt_share_sum")
    assert share == pytest.approx(attended / (30 * layers * prompt_len))
