"""LongBench harness: the scorer against values LongBench's own libraries give, and the runner
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
    task_score,
    truncate_middle,
)
from vllm_focus.testing.retrieval import KVTask

MODEL = Path(__file__).resolve().parent.parent / "examples" / "models" / "kv-retrieval-llada"


# Expected values below were printed by LongBench's own scorer's libraries on these inputs:
# rouge 1.0.1 (`Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]`) and fuzzywuzzy 0.18.0
# with python-Levenshtein 0.27.5 (`fuzz.ratio`), the versions scripts/setup.sh installs.


def test_qa_f1_normalises_then_counts_shared_tokens():
    # "cat sat" against "cat sat on mat": precision 1, recall 1/2.
    assert qa_f1("The Cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert qa_f1("dog", "cat") == 0.0


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        # one LCS over the whole text would give 5/6 here
        ("the cat sat on the mat", "the cat lay on the mat", 0.7999999950000002),
        # sentences split at periods, each reference sentence against every predicted one
        ("The budget rose. Spending fell. Taxes rose again.",
         "Spending fell sharply. The budget rose. Taxes were flat.", 0.7499999950781251),
        # distinct words counted: a whole-text LCS gives 0.5
        ("a a a b", "a b b b", 0.999999995),
        ("x. y. z", "x y z", 0.999999995),
        ("one two three", "four five", 0.0),
        ("", "anything", 0.0),  # the package raises on an empty prediction: LongBench scores 0
    ],
)  # fmt: skip
def test_rouge_l_is_the_rouge_packages(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_classification_splits_credit_and_walks_the_list_as_longbench_does():
    classes = ["LOC", "HUM", "NUM"]
    assert classification("LOC or HUM", "HUM", all_classes=classes) == 0.5
    assert classification("NUM", "HUM", all_classes=classes) == 0.0
    # "Ani" is inside the reference "Animal": removed from the list.
    assert classification("Animal", "Animal", all_classes=["Animal", "Ani"]) == 1.0
    # Removing "Ani" while the list is walked skips the next class, "Anim" (also inside the
    # reference), which therefore stays and splits the credit: 1/2, not 1.
    assert classification("Animal", "Animal", all_classes=["Ani", "Anim", "Animal"]) == 0.5


def test_retrieval_is_the_share_of_right_numbers():
    assert retrieval("Paragraph 3, then 7, Paragraph 3", "Paragraph 3") == pytest.approx(2 / 3)
    assert retrieval("none", "Paragraph 3") == 0.0


def test_code_sim_is_fuzzywuzzys_ratio_of_the_first_code_line():
    assert code_sim("# comment\nreturn a + b\n", "return a+b") == 0.91
    assert code_sim("abc", "abd") == 0.67
    assert code_sim("// only comments", "x = 1") == 0.0
    # no code line and an empty reference: fuzzywuzzy's ratio of two empty strings is 100
    assert code_sim("# only comments", "") == 1.0
    assert code_sim("    ", "") == 0.0


def test_first_line_tasks_best_answer_and_no_answers():
    assert score("trec", "HUM\nLOC", ["HUM"], ["HUM", "LOC"]) == 1.0
    assert score("qasper", "blue sky", ["red", "blue sky"]) == 1.0
    assert score("qasper", "blue sky", []) == 0.0


def test_task_score_is_rounded_as_longbench_reports_it():
    records = [("blue sky", ["blue sky"], None), ("red", ["blue"], None), ("x", ["x"], None)]
    assert task_score("qasper", records) == 66.67
    with pytest.raises(ValueError, match="qasper"):
        task_score("qasper", [])


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
            "--methods", "paper",
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
    # The paper's five methods, each answering these short records right.
    assert list(result["scores"]) == ["vanilla", "dual", "sparse-dllm", "sparsed", "focus"]
    for method in result["scores"]:
        assert result["scores"][method] == pytest.approx(expected), method
        assert result["average"][method] == pytest.approx(sum(expected.values()) / 13)
    assert json.loads((tmp_path / "longbench.json").read_text())["average"]
