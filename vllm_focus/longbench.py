"""LongBench evaluation pieces: the 13 tasks of the Focus-dLLM paper's Table 1, their scoring
(LongBench's numbers), prompt building and middle truncation. The runner is
benchmarks/longbench.py.

Data and prompts come from the user's copy of LongBench (THUDM/LongBench, v1): `data/<task>.jsonl`
records with `input`, `context`, `answers`, `all_classes`, and the official per-task prompt
templates and answer lengths (`config/dataset2prompt.json`, `config/dataset2maxlen.json`),
which this project does not copy. A template holds `{context}` and `{input}`.

Scoring gives LongBench's own numbers (its `eval.py` at THUDM/LongBench 072a5a7 and
`metrics.py`): each record scores the best of its reference answers (0 with none), a task scores
100 x the mean over its records rounded to 2 decimals, and the metrics are:
- `qa_f1`: token F1 after normalisation (lower case, punctuation removed, then the articles
  a/an/the, whitespace collapsed);
- `rouge_l`: the `rouge` package's ROUGE-L F (`Rouge().get_scores(..., avg=True)`), 0 where it
  raises (an empty prediction);
- `classification`: the classes of `all_classes` named in the prediction; those inside the
  reference class (but not equal to it) are removed while the list is walked, so the class
  after a removed one is not looked at; 1/len(list) if the reference is listed, else 0;
- `retrieval`: the reference names `Paragraph N`; the share of the numbers in the prediction
  that are N;
- `code_sim`: the first prediction line holding no backtick, `#` or `//` ("" if none), against
  the reference by `fuzzywuzzy.fuzz.ratio` / 100 on python-Levenshtein's matcher.
Predictions of trec, triviaqa and lsht are cut at their first line. The quirks this keeps on
purpose, and the one place it differs, are listed in the README (LongBench section).
`rouge`, `fuzzywuzzy` and `python-Levenshtein` are the `longbench` extra
(`pip install 'vllm-focus[longbench]'`; scripts/setup.sh installs them).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Task -> metric, the paper's Table 1 order.
TASKS = {
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "trec": "classification",
    "triviaqa": "qa_f1",
    "lsht": "classification",
    "passage_retrieval_en": "retrieval",
    "lcc": "code_sim",
    "repobench-p": "code_sim",
}
FIRST_LINE_TASKS = ("trec", "triviaqa", "lsht")
# LongBench sends these without a chat template (few-shot and code completion).
NO_CHAT_TASKS = ("trec", "triviaqa", "lsht", "lcc", "repobench-p")


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, reference: str, **_) -> float:
    predicted = normalize_answer(prediction).split()
    wanted = normalize_answer(reference).split()
    common = Counter(predicted) & Counter(wanted)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


_EXTRA = "pip install 'vllm-focus[longbench]' (rouge, fuzzywuzzy, python-Levenshtein)"


def _rouge():
    try:
        from rouge import Rouge
    except ImportError as error:
        raise ImportError(f"LongBench's ROUGE-L is the `rouge` package's: {_EXTRA}") from error
    return Rouge()


def _fuzz():
    try:
        from fuzzywuzzy import fuzz
    except ImportError as error:
        raise ImportError(f"LongBench's code similarity is fuzzywuzzy's: {_EXTRA}") from error
    if fuzz.SequenceMatcher.__module__ != "fuzzywuzzy.StringMatcher":
        # without python-Levenshtein fuzzywuzzy falls back to difflib, whose ratio differs
        raise ImportError(f"fuzzywuzzy runs without python-Levenshtein here: {_EXTRA}")
    return fuzz


def rouge_l(prediction: str, reference: str, **_) -> float:
    rouge = _rouge()
    try:
        return rouge.get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except Exception:  # LongBench scores 0 whatever the package raises (empty text)
        return 0.0


def classification(prediction: str, reference: str, all_classes=(), **_) -> float:
    named = [c for c in all_classes if c in prediction]
    walked = 0
    while walked < len(named):  # a for loop over `named` that removes from it, as LongBench's
        term = named[walked]
        walked += 1
        if term in reference and term != reference:
            named.remove(term)
    return 1.0 / len(named) if reference in named else 0.0


def retrieval(prediction: str, reference: str, **_) -> float:
    wanted = re.findall(r"Paragraph (\d+)", reference)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def code_sim(prediction: str, reference: str, **_) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if not any(marker in candidate for marker in ("`", "#", "//")):
            line = candidate
            break
    return _fuzz().ratio(line, reference) / 100


METRICS = {
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "code_sim": code_sim,
}


def score(task: str, prediction: str, answers: list[str], all_classes=None) -> float:
    """One record's score in [0, 1]: the best over its reference answers (0 with none)."""
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[TASKS[task]]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes or ()))
    return best


def task_score(task: str, records: list[tuple[str, list[str], list[str] | None]]) -> float:
    """A task's score as LongBench reports it: 100 x the mean of `score` over its (prediction,
    answers, all_classes) records, rounded to 2 decimals."""
    if not records:
        raise ValueError(f"LongBench task {task!r} has no records to score")
    total = sum(score(task, *record) for record in records)
    return round(100 * total / len(records), 2)


@dataclass(frozen=True)
class TaskConfig:
    prompt: str  # template with {context} and {input}
    max_new_tokens: int


def load_config(root: Path) -> dict[str, TaskConfig]:
    """The official templates and answer lengths from `root/config/`; names the missing file
    or task."""
    config = root / "config"
    files = {name: config / f"{name}.json" for name in ("dataset2prompt", "dataset2maxlen")}
    for path in files.values():
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: give the LongBench directory that holds config/ and data/"
            )
    prompts = json.loads(files["dataset2prompt"].read_text())
    lengths = json.loads(files["dataset2maxlen"].read_text())
    missing = [t for t in TASKS if t not in prompts or t not in lengths]
    if missing:
        raise KeyError(f"{root / 'config'} has no prompt or length for tasks {missing}")
    return {t: TaskConfig(prompts[t], int(lengths[t])) for t in TASKS}


def load_records(root: Path, task: str, limit: int | None = None) -> list[dict]:
    path = root / "data" / f"{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing (LongBench's data/{task}.jsonl)")
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                record = json.loads(line)
                for key in ("input", "context", "answers"):
                    if key not in record:
                        raise KeyError(f"{path}:{number} has no {key!r}")
                records.append(record)
            if limit is not None and len(records) >= limit:
                break
    return records


def truncate_middle(ids: list[int], budget: int) -> tuple[list[int], list[int]]:
    """LongBench's truncation: the first and the last budget/2 tokens (one part if it fits)."""
    if len(ids) <= budget:
        return ids, []
    half = budget // 2
    return ids[:half], ids[len(ids) - half :]


def build_prompt(tokenizer, task: str, record: dict, config: TaskConfig, budget: int, chat: bool):
    """Token ids of one record's prompt: the template filled, middle-truncated to `budget`
    tokens (decoded back to text, special tokens dropped, only when too long), then (for chat
    models, tasks other than few-shot and code) the chat template."""
    text = config.prompt.format(context=record["context"], input=record["input"])
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > budget:  # as LongBench: only a truncated prompt goes through decode
        head, tail = truncate_middle(ids, budget)
        text = "".join(tokenizer.decode(part, skip_special_tokens=True) for part in (head, tail))
    if chat and task not in NO_CHAT_TASKS:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
    return tokenizer.encode(text, add_special_tokens=True)
