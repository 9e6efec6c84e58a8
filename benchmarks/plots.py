"""Plots of benchmarks/results/throughput.json (written by throughput.py, or re-drawn alone):

    python benchmarks/plots.py [benchmarks/results/throughput.json]

Per model: tokens/s against prompt length per method (as measured, and with the per-step
engine overhead taken out), and the speedups over vanilla and over Fast-dLLM `dual`.
Extrapolated points (vanilla at long prompts) are hollow and dashed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {
    "vanilla": ("tab:gray", "o"),
    "prefix": ("tab:blue", "s"),
    "dual": ("tab:orange", "D"),
    "focus-block": ("tab:green", "^"),
    "focus-prefill": ("tab:red", "v"),
}


def _series(entries: list[dict], model: str, method: str, key: str):
    """(prompt length, value, extrapolated) points; a ratio to an extrapolated vanilla is
    extrapolated too."""
    guessed_vanilla = {
        e["prompt_len"]
        for e in entries
        if e["model"] == model and e["method"] == "vanilla" and e["extrapolated"]
    }
    return sorted(
        (
            e["prompt_len"],
            e[key],
            e["extrapolated"] or ("vanilla" in key and e["prompt_len"] in guessed_vanilla),
        )
        for e in entries
        if e["model"] == model and e["method"] == method and e.get(key) is not None
    )


def _draw(ax, points, method: str, label: str) -> None:
    """Measured points solid; extrapolated ones hollow, joined to the last measured by a dash."""
    color, marker = STYLE.get(method, ("black", "x"))
    measured = [p for p in points if not p[2]]
    guessed = [p for p in points if p[2]]
    tail = measured[-1:] + guessed
    for subset, line, face, suffix in (
        (measured, "-", color, ""),
        (guessed, "none", "none", " (extrapolated)"),
    ):
        if subset:
            xs, ys = [p[0] for p in subset], [p[1] for p in subset]
            ax.plot(xs, ys, color=color, linestyle=line, linewidth=1, marker=marker,
                    markerfacecolor=face, label=label + suffix)  # fmt: skip
    if guessed:
        ax.plot([p[0] for p in tail], [p[1] for p in tail], color=color, linestyle="--", lw=1)


def _axes_setup(ax, title: str, ylabel: str, lengths: list[int], minor: bool = False) -> None:
    """Log-log axes; `minor`: label the minor y ticks too (for an axis spanning < a decade)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if minor else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)

    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def plot_throughput(result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["table"]
    settings = result["settings"]
    caption = (
        f"gen {settings['gen']}, block {settings['block']}, {settings['steps']} steps, "
        f"one request; {result['machine']['processor']}, {result['machine']['affinity']} cores"
    )
    written = []
    for model in dict.fromkeys(e["model"] for e in entries):
        methods = list(dict.fromkeys(e["method"] for e in entries if e["model"] == model))
        lengths = sorted({e["prompt_len"] for e in entries if e["model"] == model})
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, key, title in (
            (axes[0], "tokens_per_s", "end to end, as measured"),
            (axes[1], "model_tokens_per_s", "per-step engine overhead taken out"),
        ):
            for method in methods:
                _draw(ax, _series(entries, model, method, key), method, method)
            _axes_setup(ax, title, "tokens/s", lengths)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{model}: tokens/s vs prompt length ({caption})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"throughput-{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, ref in ((axes[0], "vanilla"), (axes[1], "dual")):
            for method in methods:
                if method in (ref, "vanilla"):
                    continue
                _draw(ax, _series(entries, model, method, f"speedup_vs_{ref}"), method, method)
            ax.axhline(1.0, color="black", linewidth=0.8)
            _axes_setup(ax, f"speedup over {ref}", f"x {ref} tokens/s", lengths, ref == "dual")
            ax.legend(fontsize=7)
        fig.suptitle(f"{model}: speedups vs prompt length, end to end ({caption})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"speedup-{model}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    source = Path(
        sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "throughput.json"
    )
    for path in plot_throughput(json.loads(source.read_text()), source.parent):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
