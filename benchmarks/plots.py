"""Plots of benchmarks/results/throughput.json (written by throughput.py, or re-drawn alone):

    python benchmarks/plots.py [benchmarks/results/throughput.json]

Per model:
- `throughput-<model>.png`: aggregate tokens/s against the number of concurrent requests, one
  panel per prompt length, end to end (solid) and decode-only (dashed), per method;
- `speedup-<model>.png`: each sparse method's speedup over the dense method with the same
  cache and refresh policy (focus-block and sparse-dllm over dual, focus-prefill over
  dual-prefill, sparsed over vanilla) against prompt length, one line per concurrency: end to
  end, decode-only, and per within-block step.

A sweep of one concurrency draws tokens/s as bars per prompt length instead. The names carry
the JSON's stem when it is not `throughput` (`throughput-methods.json` ->
`throughput-methods-<model>.png`, `throughput-methods-speedup-<model>.png`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {
    "vanilla": ("tab:gray", "o"),
    "prefix": ("tab:blue", "s"),
    "dual": ("tab:orange", "D"),
    "dual-prefill": ("tab:brown", "P"),
    "focus-block": ("tab:green", "^"),
    "focus-prefill": ("tab:red", "v"),
    "sparse-dllm": ("tab:purple", "*"),
    "sparsed": ("tab:olive", "X"),
}
# The sparse methods, each plotted over the dense method with its cache and refresh policy.
SPARSE = ("focus-block", "focus-prefill", "sparse-dllm", "sparsed")


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def plot_throughput(result: dict, out_dir: Path, stem: str = "throughput") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    entries = result["table"]
    settings = result["settings"]
    caption = (
        f"gen {settings['gen']}, block {settings['block']}, {settings['steps']} steps; "
        f"{result['machine']['processor']}, {result['machine']['affinity']} cores"
    )
    written = []
    for model in dict.fromkeys(e["model"] for e in entries):
        mine = [e for e in entries if e["model"] == model]
        lengths = sorted({e["prompt_len"] for e in mine})
        methods = list(dict.fromkeys(e["method"] for e in mine))
        names = (
            (f"throughput-{model}.png", f"speedup-{model}.png")
            if stem == "throughput"
            else (f"{stem}-{model}.png", f"{stem}-speedup-{model}.png")
        )
        if len({e["concurrency"] for e in mine}) == 1:
            written.append(_bars(plt, mine, methods, lengths, model, caption, out_dir / names[0]))
            lengths_axes = []
        else:
            fig, axes = plt.subplots(
                1, len(lengths), figsize=(max(8, 4.6 * len(lengths)), 4), squeeze=False
            )
            lengths_axes = list(zip(axes[0], lengths))
        for ax, length in lengths_axes:
            for method in methods:
                points = sorted(
                    (e["concurrency"], e["tokens_per_s"], e["decode_tokens_per_s"])
                    for e in mine
                    if e["prompt_len"] == length and e["method"] == method
                )
                if not points:
                    continue
                color, marker = STYLE.get(method, ("black", "x"))
                xs = [p[0] for p in points]
                ax.plot(xs, [p[1] for p in points], color=color, marker=marker, label=method)
                ax.plot(xs, [p[2] for p in points], color=color, marker=marker,
                        linestyle="--", markerfacecolor="none", linewidth=0.8)  # fmt: skip
            concurrency = sorted({e["concurrency"] for e in mine})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(concurrency, [str(n) for n in concurrency])
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel("aggregate tokens/s")
            ax.set_title(f"prompt {_k(length)}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        if lengths_axes:
            axes[0][0].legend(
                fontsize=7, title="solid: end to end, dashed: decode", title_fontsize=7
            )
            fig.suptitle(f"{model}: tokens/s vs concurrency ({caption})", fontsize=10)
            fig.tight_layout()
            path = out_dir / names[0]
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)

        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for ax, key, title in (
            (axes[0], "speedup_vs_same", "end to end"),
            (axes[1], "decode_speedup_vs_same", "decode-only"),
            (axes[2], "step_speedup_vs_same", "one within-block step"),
        ):
            for method in SPARSE:
                color, marker = STYLE[method]
                for n in sorted({e["concurrency"] for e in mine}):
                    points = sorted(
                        (e["prompt_len"], e[key])
                        for e in mine
                        if e["method"] == method and e["concurrency"] == n and e.get(key)
                    )
                    if points:
                        width = 0.6 + 0.5 * (n.bit_length() - 1) / 2
                        xs, ys = [p[0] for p in points], [p[1] for p in points]
                        label = f"{method}, N={n}"
                        ax.plot(xs, ys, color=color, marker=marker, lw=width, label=label)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [_k(n) for n in lengths])
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("x the same-refresh dense method")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(
            f"{model}: sparse methods over dense with the same cache and refresh ({caption})",
            fontsize=10,
        )
        fig.tight_layout()
        path = out_dir / names[1]
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _bars(plt, mine, methods, lengths, model, caption, path: Path) -> Path:
    """Tokens/s end to end per method, grouped by prompt length (one concurrency)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * len(lengths)), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        color, _ = STYLE.get(method, ("black", "x"))
        for j, length in enumerate(lengths):
            row = next(
                (e for e in mine if e["method"] == method and e["prompt_len"] == length), None
            )
            if row is None:
                continue
            bar = ax.bar(j + i * width, row["tokens_per_s"], width, color=color,
                         label=method if j == 0 else None)  # fmt: skip
            mark = "~" if row["extrapolated"] else ""
            ax.bar_label(bar, [f"{mark}{row['tokens_per_s']:.2f}"], fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lengths))],
                  [f"prompt {_k(n)}" for n in lengths])  # fmt: skip
    ax.set_ylabel("tokens/s end to end (~: extrapolated)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    n = mine[0]["concurrency"]
    fig.suptitle(f"{model}: tokens/s per method, N={n} ({caption})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    source = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "throughput.json"
    )
    for path in plot_throughput(json.loads(source.read_text()), source.parent, source.stem):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
