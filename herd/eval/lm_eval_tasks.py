"""lm-evaluation-harness task configs over the same local files herd reads, with the settings where the two agree
(for the agreement tests and ``benchmarks/bench_eval.py``): MMLU 5-shot letter log-likelihood (lm-eval's own
``mmlu`` template and description, few-shot from dev, ``first_n``), ARC-Challenge as MMLU-style letters (25 shots
from train, ``first_n``), GSM8K 8-shot CoT (lm-eval's own ``gsm8k_cot.yaml``, pointed at the local test file), and
AGIEval English multiple-choice exams in the AGIEval loader's few-shot layout (lm-eval's own ``agieval`` tasks are
0-shot over pre-rendered HF copies; this is the 3-5-shot setting Meta reports, rendered by lm-eval's Jinja templates
from the data set's fields: the exemplars as ``fewshot_config.samples``, the letter after "The answer is therefore").
The data is written as JSONL next to the YAML files (a scratch directory, not the benchmark folder)."""

from __future__ import annotations

import json
from pathlib import Path

from herd.eval.tasks.base import read_csv_rows, read_jsonl


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tasks(data_dir: str | Path, out: str | Path, mmlu_subjects: list[str], gsm8k_max_tokens: int = 512,
                agieval_exams: tuple[str, ...] = (), bbh_tasks: tuple[str, ...] = (), bbh_max_tokens: int = 1024
                ) -> dict[str, str]:
    """Write the YAML (and JSONL) files into ``out``; returns {herd task, MMLU subject or ``agieval/<exam>``: lm-eval
    task name}."""
    import yaml
    from lm_eval import tasks as lm_tasks

    data_dir, out = Path(data_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = {}
    for subject in mmlu_subjects:
        files = {}
        for split in ("dev", "test"):
            rows = read_csv_rows(data_dir / "mmlu" / "data" / split / f"{subject}_{split}.csv")
            files[split] = str(_write_jsonl(out / f"mmlu_{subject}_{split}.jsonl", [
                {"question": r[0], "choices": r[1:5], "answer": "ABCD".index(r[5])} for r in rows]))
        cfg = {"task": f"herd_mmlu_{subject}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
               "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
               "output_type": "multiple_choice", "num_fewshot": 5,
               # lm-eval's mmlu/default/_default_template_yaml and its per-subject description
               "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                              "D. {{choices[3]}}\nAnswer:",
               "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
               "description": f"The following are multiple choice questions (with answers) about "
                              f"{subject.replace('_', ' ')}.\n\n",
               "metric_list": [{"metric": "acc"}]}
        (out / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg))
        names[subject] = cfg["task"]
    files = {}
    for split, name in (("train", "Train"), ("test", "Test")):
        recs = []
        for r in read_jsonl(data_dir / "arc_challenge" / f"ARC-Challenge-{name}.jsonl"):
            labels = [c["label"] for c in r["question"]["choices"]]
            recs.append({"id": r["id"], "stem": r["question"]["stem"],
                         "choices": [c["text"] for c in r["question"]["choices"]],
                         "letters": list("ABCDE"[: len(labels)]), "answer": labels.index(r["answerKey"])})
        files[split] = str(_write_jsonl(out / f"arc_{split}.jsonl", recs))
    cfg = {"task": "herd_arc_letters", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
           "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
           "output_type": "multiple_choice", "num_fewshot": 25,
           "doc_to_text": "{{stem.strip()}}\n{% for c in choices %}{{letters[loop.index0]}}. {{c}}\n{% endfor %}"
                          "Answer:",
           "doc_to_choice": "{{letters}}", "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]}
    (out / "herd_arc_letters.yaml").write_text(yaml.safe_dump(cfg))
    names["arc_challenge"] = cfg["task"]
    cot = yaml.safe_load((Path(lm_tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml").read_text())
    cot.update({"task": "herd_gsm8k_cot", "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data_dir / "gsm8k" / "test.jsonl")}}})
    cot.pop("tag", None)
    cot["generation_kwargs"]["max_gen_toks"] = gsm8k_max_tokens
    (out / "herd_gsm8k_cot.yaml").write_text(yaml.safe_dump(cot))
    names["gsm8k"] = "herd_gsm8k_cot"
    for exam in agieval_exams:
        names[f"agieval/{exam}"] = _write_agieval(data_dir, out, exam)
    for name in bbh_tasks:
        names[f"bbh/{name}"] = _write_bbh(data_dir, out, name, bbh_max_tokens)
    return names


def _write_bbh(data_dir: Path, out: Path, name: str, max_tokens: int) -> str:
    """lm-eval's own ``bbh_cot_fewshot_<name>`` (its YAML and template, exemplars embedded) over the local task file."""
    import yaml
    from lm_eval import tasks as lm_tasks

    folder = Path(lm_tasks.__file__).parent / "bbh" / "cot_fewshot"
    cfg = yaml.safe_load((folder / "_cot_fewshot_template_yaml").read_text())
    cfg.update(yaml.safe_load((folder / f"{name}.yaml").read_text()))
    cfg.pop("include", None)
    examples = json.loads((data_dir / "bbh" / "bbh" / f"{name}.json").read_text(encoding="utf-8"))["examples"]
    test = _write_jsonl(out / f"bbh_{name}.jsonl", examples)
    cfg.update({"task": f"herd_bbh_{name}", "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(test)}}})
    cfg.pop("tag", None)
    cfg["generation_kwargs"]["max_gen_toks"] = max_tokens
    (out / f"herd_bbh_{name}.yaml").write_text(yaml.safe_dump(cfg))
    return cfg["task"]


AGIEVAL_TEXT = ("Problem {{number}}.   {{passage if passage else ''}} {{question}}\n"
                "Choose from the following options:    {{options | join(' ')}}\nThe answer is therefore")


def _write_agieval(data_dir: Path, out: Path, exam: str) -> str:
    import yaml

    from herd.eval.tasks.agieval import exemplars

    def doc(row: dict, number: int, passage: bool = True) -> dict:
        letters = list("ABCDE"[: len(row["options"])])
        return {"passage": row.get("passage") if passage else None, "question": row["question"],
                "options": row["options"], "letters": letters, "answer": letters.index(row["label"]),
                "number": number}

    demos = exemplars(data_dir, exam)
    shots = [doc(d, i + 1, exam != "sat-en-without-passage") for i, d in enumerate(demos)]
    rows = read_jsonl(data_dir / "agieval" / "data" / "v1" / f"{exam}.jsonl")
    test = _write_jsonl(out / f"agieval_{exam}.jsonl", [doc(r, len(demos) + 1) for r in rows])
    name = f"herd_agieval_{exam.replace('-', '_')}"
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(test)}},
           "test_split": "test", "output_type": "multiple_choice", "num_fewshot": len(demos),
           "fewshot_config": {"sampler": "first_n", "samples": shots},
           "description": "Here are the answers for the problems in the exam.\n", "doc_to_text": AGIEVAL_TEXT,
           "doc_to_choice": "{{letters}}", "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]}
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return name
