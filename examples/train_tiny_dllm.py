"""Train a small LLaDA-architecture masked diffusion model on key-value retrieval (CPU or CUDA).

    python examples/train_tiny_dllm.py --out /tmp/kv-trained                     # ~3000 steps
    python examples/train_tiny_dllm.py --out /tmp/kv --steps 400 --max-len 256   # a quick check

NOT the shipped model: on this project's 2-core machines a 400-step check (4 min) stayed at
chance (loss ~2.2 = ln 10 on the digits), as did an earlier 41-minute run of a similar design,
so `examples/models/kv-retrieval-llada` is the hand-set retrieval circuit of
`vllm_focus.testing.retrieval` (see its model card). This script is the training route for a
machine with a GPU (`--device cuda`).

The task (`vllm_focus.testing.retrieval.KVTask`): a long context of filler sentences and
records `KEY : d d d ;` (a key word and its 3-digit value), then questions `? KEY : d d d ;`
about keys of the context; the last question is the one a user asks, answered by its three
digits and EOS. Every question's digits can only be predicted by finding the key's record in
the context, so one sequence carries many retrieval targets (a single answer per sequence is
too little signal for a small model).

The objective is LLaDA's masked diffusion loss on the answer positions: draw t ~ U(t_min, 1),
mask each answer token (the digits of every question and the final EOS) with probability t,
predict the masked tokens from the rest. Each masked token's loss is weighted by the inverse
of the realised mask fraction of its sequence (not 1/t, whose spikes at small t stall training),
i.e. the mean loss over the masked tokens. Context lengths grow over training (a curriculum
from `--min-len` to `--max-len` tokens), so that the model retrieves at every length it serves.

The model is written out in LLaDA's published layout (config.json with LLaDA's keys,
`model.transformer.*` tensors in safetensors shards, a tokenizer with LLaDA's special tokens),
so it loads through the normal path: `vllm serve DIR`, `LLM(DIR)`, the reference decoder.
Progress bar, `--seed`, and `--resume` from the last checkpoint in `--work`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_focus.testing.retrieval import VALUE_DIGITS, KVTask, write_task_checkpoint

# ---------------------------------------------------------------------------- the model


@dataclass
class Shape:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 384
    rope_theta: float = 100000.0
    max_len: int = 8192


class LLaDAModel(torch.nn.Module):
    """LLaDA's forward (RMSNorm, rotate-half RoPE, bidirectional attention, SwiGLU) with its
    published parameter names, so that `state_dict()` is the checkpoint."""

    def __init__(self, shape: Shape, vocab_size: int) -> None:
        super().__init__()
        self.shape, self.vocab_size = shape, vocab_size
        d, h = shape.d_model, shape.mlp_hidden
        params = {"model.transformer.wte.weight": (vocab_size, d)}
        for n in range(shape.n_layers):
            prefix = f"model.transformer.blocks.{n}."
            params |= {prefix + "attn_norm.weight": (d,), prefix + "ff_norm.weight": (d,)}
            for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
                params[prefix + name + ".weight"] = (d, d)
            params |= {prefix + "ff_proj.weight": (h, d), prefix + "up_proj.weight": (h, d)}
            params[prefix + "ff_out.weight"] = (d, h)
        params |= {"model.transformer.ln_f.weight": (d,)}
        params |= {"model.transformer.ff_out.weight": (vocab_size, d)}
        self.names = list(params)
        self.weights = torch.nn.ParameterList()
        for name, size in params.items():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                tensor = torch.ones(size)
            else:
                tensor = torch.randn(size) * 0.02
                if name.endswith("attn_out.weight") or name.endswith("ff_out.weight"):
                    tensor /= math.sqrt(2 * shape.n_layers)
            self.weights.append(torch.nn.Parameter(tensor))
        exponent = torch.arange(0, d // shape.n_heads, 2, dtype=torch.float32)
        self.register_buffer(
            "inv_freq", 1.0 / shape.rope_theta ** (exponent / (d // shape.n_heads)), False
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: w.detach().cpu().contiguous() for name, w in zip(self.names, self.weights)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab]."""
        w = dict(zip(self.names, self.weights))
        batch, length = ids.shape
        heads, d = self.shape.n_heads, self.shape.d_model
        head_dim = d // heads
        t = torch.arange(length, device=ids.device, dtype=torch.float32)
        freqs = t[:, None] * self.inv_freq[None, :]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[None, None]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[None, None]

        def rope(x):
            half = head_dim // 2
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        h = F.embedding(ids, w["model.transformer.wte.weight"])
        for n in range(self.shape.n_layers):
            p = f"model.transformer.blocks.{n}."
            x = _rms(h, w[p + "attn_norm.weight"])
            q, k, v = (
                (x @ w[p + name + ".weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
                for name in ("q_proj", "k_proj", "v_proj")
            )
            attn = F.scaled_dot_product_attention(rope(q), rope(k), v)
            h = h + attn.transpose(1, 2).reshape(batch, length, d) @ w[p + "attn_out.weight"].T
            x = _rms(h, w[p + "ff_norm.weight"])
            gate = F.silu(x @ w[p + "ff_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)
            h = h + gate @ w[p + "ff_out.weight"].T
        h = _rms(h, w["model.transformer.ln_f.weight"])
        return h @ w["model.transformer.ff_out.weight"].T


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ---------------------------------------------------------------------------- training


def make_batch(task: KVTask, rng: random.Random, size: int, length: int, questions: int):
    """Padded ids [B, T], the masked input, and the loss weights per position."""
    examples = [task.training_example(rng, length, questions) for _ in range(size)]
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((size, width), task.eos, dtype=torch.long)
    noisy = ids.clone()
    weight = torch.zeros(size, width)
    for row, (example, answer) in enumerate(examples):
        ids[row, : len(example)] = torch.tensor(example)
        noisy[row, : len(example)] = torch.tensor(example)
        t = rng.uniform(0.05, 1.0)
        masked = [p for p in answer if rng.random() < t] or [rng.choice(answer)]
        noisy[row, masked] = task.mask
        weight[row, masked] = 1.0 / len(masked)  # mean over the realised masked tokens
    return ids, noisy, weight


@torch.no_grad()
def probe_accuracy(model, task: KVTask, rng: random.Random, length: int, count: int, device):
    """Share of questions whose 3 digits all come out right when the whole answer is masked
    and predicted in one forward (a quick stand-in for decoding)."""
    model.eval()
    right = 0
    for _ in range(count):
        question = task.question_for(rng, length)
        prompt = question.prompt
        ids = torch.tensor([prompt + [task.mask] * (VALUE_DIGITS + 1)], device=device)
        logits = model(ids)[0, len(prompt) : len(prompt) + VALUE_DIGITS]
        right += logits.argmax(-1).tolist() == question.answer
    model.train()
    return right / count


def length_at(step: int, steps: int, min_len: int, max_len: int) -> int:
    """Curriculum: the context length doubles from min_len to max_len over the first 70% of
    training; each batch draws its length between half the current maximum and the maximum."""
    fraction = min(1.0, step / max(1, 0.7 * steps))
    return int(min_len * (max_len / min_len) ** fraction)


def train(args) -> None:
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    task = KVTask()
    shape = Shape(args.d_model, args.layers, args.heads, args.mlp_hidden)
    model = LLaDAModel(shape, len(task.words)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_path, start, log = work / "state.pt", 0, []
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start, log = state["step"], state["log"]
    progress = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train")
    started = time.time()
    for step in progress:
        top = length_at(step, args.steps, args.min_len, args.max_len)
        length = rng.randint(max(args.min_len, top // 2), top)
        # Fewer sequences per batch as they grow: about the same tokens per step.
        size = max(1, args.batch_tokens // length)
        ids, noisy, weight = make_batch(task, rng, size, length, args.questions)
        ids, noisy, weight = ids.to(device), noisy.to(device), weight.to(device)
        warm = min(1.0, (step + 1) / args.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
        logits = model(noisy)
        losses = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
        loss = (losses * weight).sum() / size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "length": length}
        if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            entry["probe_len"] = top
            entry["probe_acc"] = probe_accuracy(model, task, rng, top, 32, device)
            progress.set_postfix(loss=entry["loss"], len=top, acc=entry["probe_acc"])
        log.append(entry)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "step": step + 1,
                "log": log,
            }
            torch.save(state, state_path)
    minutes = (time.time() - started) / 60
    export(model, shape, Path(args.out), args, log, minutes)


def export(model, shape: Shape, out: Path, args, log, minutes: float) -> None:
    """Write the checkpoint in LLaDA's published layout, with the training record."""
    write_task_checkpoint(
        out,
        model.tensors(),
        hidden=shape.d_model,
        layers=shape.n_layers,
        heads=shape.n_heads,
        mlp_hidden=shape.mlp_hidden,
        rope_theta=shape.rope_theta,
        max_len=shape.max_len,
    )
    record = {
        "command": "python examples/train_tiny_dllm.py " + " ".join(args.argv),
        "shape": asdict(shape),
        "train_minutes": round(minutes, 1),
        "device": args.device,
        "log": log[-50:] if len(log) > 50 else log,
        "probes": [e for e in log if "probe_acc" in e],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the checkpoint goes")
    parser.add_argument("--work", default="/tmp/train-tiny-dllm", help="resumable state")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--mlp-hidden", type=int, default=384)
    parser.add_argument("--probe-every", type=int, default=100)
    parser.add_argument("--save-every", type=int, default=100)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    train(args)


if __name__ == "__main__":
    main()
