"""LongBench harness: the re-implemented metrics against hand-computed values, and the runner
(benchmarks/longbench.py) end to end on synthetic records in LongBench's schema, with the
retrieval model so that the scores mean something: its answers are right, so every task scores
100 except passage retrieval (whose metric reads paragraph numbers the answers do not have) and
the code tasks (see below)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from vllm_focus.longbench import (
    TASKS,
    classification,
    code_sim,
    load_config,
    qa_f1,
    retrieval,
    rouge_l,
    score,
    truncate_middle,
)
from vllm_focus.testing.retrieval import KVTask

MODEL = Path(__file__).resolve().parent.parent / "examples" / "models" / "kv-retrieval-llada"


def test_qa_f1_normalises_then_counts_shared_tokens():
    # "cat sat" against "cat sat on mat": precision 1, recall 1/2.
    assert qa_f1("The Cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert qa_f1("dog", "cat") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "anything") == 0.0


def test_classification_splits_credit_and_drops_substrings_of_the_reference():
    classes = ["LOC", "HUM", "NUM"]
    assert classification("LOC or HUM", "HUM", all_classes=classes) == 0.5
    assert classification("NUM", "HUM", all_classes=classes) == 0.0
    # "Ani" is inside the reference "Animal": not counted against it.
    assert classification("Animal", "Animal", all_classes=["Animal", "Ani"]) == 1.0


def test_retrieval_is_the_share_of_right_numbers():
    assert retrieval("Paragraph 3, then 7, Paragraph 3", "Paragraph 3") == pytest.approx(2 / 3)
    assert retrieval("none", "Paragraph 3") == 0.0


def test_code_sim_takes_the_first_code_line():
    # "return a + b" (12 chars) vs "return a+b" (10): LCS 10, 2 * 10 / 22 = 0.909 -> 0.91.
    assert code_sim("# comment\nreturn a + b\n", "return a+b") == 0.91
    assert code_sim("// only comments", "x = 1") == 0.0


def test_first_line_tasks_and_best_answer():
    assert score("trec", "HUM\nLOC", ["HUM"], ["HUM", "LOC"]) == 1.0
    assert score("qasper", "blue sky", ["red", "blue sky"]) == 1.0


def test_truncation_keeps_both_ends():
    assert truncate_middle(list(range(10)), 4) == ([0, 1], [8, 9])
    assert truncate_middle([1, 2], 4) == ([1, 2], [])


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset2prompt.json"):
        load_config(tmp_path)


def _synthetic_longbench(root: Path, per_task: int) -> None:
    """LongBench's layout with retrieval-task records: context + key, the key's digits."""
    task, rng = KVTask(), random.Random(3)
    (root / "data").mkdir(parents=True)
    (root / "config").mkdir()
    prompts, lengths = {}, {}
    for name in TASKS:
        prompts[name] = "{context} ? {input} :"
        lengths[name] = 4
        with (root / "data" / f"{name}.jsonl").open("w") as handle:
            for _ in range(per_task):
                context, values = task.context(rng, 300, 8)
                key = rng.choice(list(values))
                answer = task.text(values[key])
                record = {
                    "input": task.words[key],
                    "context": task.text(context),
                    "answers": [answer],
                    "all_classes": [answer, "9 9 9"],
                    "length": 300,
                }
                handle.write(json.dumps(record) + "\n")
    (root / "config" / "dataset2prompt.json").write_text(json.dumps(prompts))
    (root / "config" / "dataset2maxlen.json").write_text(json.dumps(lengths))


def test_runner_on_synthetic_records(tmp_path):
    _synthetic_longbench(tmp_path / "LongBench", per_task=2)
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "longbench.py"
    spec = importlib.util.spec_from_file_location("longbench_runner", path)
    runner = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = runner
    spec.loader.exec_module(runner)
    result = runner.main(
        [
            "--longbench", str(tmp_path / "LongBench"),
            "--model", str(MODEL),
            "--methods", "dual", "focus",
            "--budget", "1024",
            "--gen-length", "4",
            "--block-length", "4",
            "--focus-knobs", json.dumps({"min_prompt_len": 64}),
            "--no-chat",
            "--dtype", "float32",
            "--kv-cache-bytes", str(64 << 20),
            "--out", str(tmp_path / "longbench.json"),
        ]
    )  # fmt: skip
    # The word-level tokenizer's text of an answer starts with a space (" 4 0 7"): the code
    # metric compares the raw line, 2 * 5 / (6 + 5) -> 0.91; the others normalise or split.
    expected = {task: 100.0 for task in TASKS}
    expected |= {"passage_retrieval_en": 0.0, "lcc": 91.0, "repobench-p": 91.0}
    for method in ("dual", "focus"):
        assert result["scores"][method] == pytest.approx(expected)
        assert result["average"][method] == pytest.approx(sum(expected.values()) / 13)
    assert json.loads((tmp_path / "longbench.json").read_text())["average"]
