"""Prompts and answer extraction against their references, without running a model:

- BBH: herd's prompt (the data set's ``cot-prompts`` file) against lm-eval's own ``bbh_cot_fewshot`` task YAMLs
  (description + three exemplars + the question), for all 27 tasks; herd's answer extraction against lm-eval's
  ``get-answer`` filter on every BBH gold answer, and the cases where the two differ.
- MATH: herd's 4-shot Minerva prompt equals lm-eval's ``minerva_math`` prompt for all 500 MATH-500 items.
- HumanEval: the prompt, stop sequences and executed program of lm-eval's ``humaneval``.
- ``--chat``: the ids herd feeds a model directory for real chat items of every task equal transformers'
  ``apply_chat_template`` with Meta's Llama 3 Instruct chat template on Meta's tokenizer.
"""

import functools
import json

import pytest

from herd.eval import metrics
from herd.eval.tasks import TaskOptions, build_task

from .conftest import ROOT

DATA = ROOT.parent / "shared" / "benchmarks"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason=f"benchmarks not found at {DATA}")


@functools.cache
def lm_eval_bbh_config(name: str) -> dict:
    import yaml
    from lm_eval import tasks as lm_tasks

    folder = __import__("pathlib").Path(lm_tasks.__file__).parent / "bbh" / "cot_fewshot"
    cfg = yaml.safe_load((folder / "_cot_fewshot_template_yaml").read_text())
    cfg.update(yaml.safe_load((folder / f"{name}.yaml").read_text()))
    return cfg


def lm_eval_bbh_context(cfg: dict, doc: dict) -> str:
    """lm-eval's few-shot context: description, then each exemplar as doc_to_text + target_delimiter + target,
    joined by the fewshot delimiter ("\\n\\n"), then doc_to_text of the item (lm-eval's own Jinja renderer)."""
    from lm_eval.utils import apply_template

    shots = [apply_template(cfg["doc_to_text"], s) + cfg["target_delimiter"] + s["target"]
             for s in cfg["fewshot_config"]["samples"]]
    return cfg["description"] + "\n\n".join(shots) + "\n\n" + apply_template(cfg["doc_to_text"], doc)


def test_bbh_prompts_are_lm_evals_bbh_cot_fewshot_prompts_without_the_final_newline():
    """lm-eval's ``doc_to_text`` ends "A: Let's think step by step.\\n"; herd ends without the newline, as the data
    set's prompt files do (their reasoning follows on the next line). For sports_understanding the files continue
    the exemplar on the same line ("step by step. Bam ..."), which lm-eval's YAML turns into a newline."""
    from herd.eval.tasks.bbh import task_names

    names = task_names(DATA)
    assert len(names) == 27
    spec = build_task("bbh", DATA, TaskOptions(limit=2))
    by_id = {it.id: it for it in spec.items}
    for name in names:
        cfg = lm_eval_bbh_config(name)
        assert cfg["num_fewshot"] == 3 and cfg["target_delimiter"] == ""
        examples = json.loads((DATA / "bbh" / "bbh" / f"{name}.json").read_text())["examples"]
        for i in range(2):
            ours = by_id[f"{name}/{i}"].prompt
            theirs = lm_eval_bbh_context(cfg, examples[i])
            if name == "sports_understanding":
                ours = ours.replace("A: Let's think step by step. ", "A: Let's think step by step.\n")
            assert theirs == ours + "\n", name


@functools.cache
def lm_eval_bbh_filter():
    from lm_eval.filters.extraction import RegexFilter

    (regex_step, take_first), = [f["filter"] for f in lm_eval_bbh_config("date_understanding")["filter_list"]]
    assert regex_step["function"] == "regex" and take_first["function"] == "take_first"
    return RegexFilter(regex_pattern=regex_step["regex_pattern"])


def lm_eval_bbh_answer(completion: str) -> str:
    return lm_eval_bbh_filter().apply([[completion]], [{}])[0][0]


def test_bbh_answer_extraction_agrees_with_lm_eval_on_every_gold_answer():
    from herd.eval.tasks.bbh import task_names

    n = 0
    for name in task_names(DATA):
        for ex in json.loads((DATA / "bbh" / "bbh" / f"{name}.json").read_text())["examples"]:
            completion = f"Step one. Step two.\nSo the answer is {ex['target']}.\n"
            assert metrics.bbh_extract(completion) == lm_eval_bbh_answer(completion) == ex["target"]
            n += 1
    assert n == 6511


@pytest.mark.parametrize("completion,herd,lm_eval", [
    ("So the answer is (B)", "(B)", "(B"),  # no closing period: lm-eval's "(?=.)" drops the last character
    ("the answer is 3. Wait, the answer is 4.", "4", "3. Wait, the answer is 4"),  # herd: the last answer line
    ("the answer is (A).\nQ: next, the answer is (C).", "(C)", "(A)"),  # lm-eval: the first match
    ("(B)", "(B)", "[invalid]"),  # no "the answer is": herd compares the whole completion
])
def test_bbh_extraction_differences_from_lm_eval_are_the_documented_ones(completion, herd, lm_eval):
    assert metrics.bbh_extract(completion) == herd
    assert lm_eval_bbh_answer(completion) == lm_eval


# Meta's chat template for Llama 3 Instruct (tokenizer_config.json of meta-llama/Meta-Llama-3-8B-Instruct).
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.mark.slow
def test_chat_prompts_render_as_metas_llama3_chat_template(llama3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    import herd
    from herd.eval.backends import LocalBackend

    llama3_tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    model = herd.Transformer(herd.ModelArgs.from_name("tiny", vocab_size=llama3_tokenizer.n_words, dim=16,
                                                      n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=8192))
    backend = LocalBackend(model, llama3_tokenizer, [llama3_tokenizer.eos_id])
    checked, untrimmed = 0, set()
    for task in ("mmlu", "arc_challenge", "gpqa", "gsm8k", "math", "bbh", "agieval_en", "humaneval", "drop"):
        for item in build_task(task, DATA, TaskOptions(chat=True, limit=1)).items[:3]:
            assert isinstance(item.prompt, list)
            theirs = hf.apply_chat_template(item.prompt, chat_template=META_LLAMA3_TEMPLATE,
                                            add_generation_prompt=True, tokenize=True)
            theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
            assert backend.encode_prompt(item.prompt) == theirs, (task, item.id)
            if any(m["content"] != m["content"].strip() for m in item.prompt):
                untrimmed.add(task)
            checked += 1
    assert checked == 17
    assert "agieval_en" in untrimmed  # the loader's chat turns end with "\n": the template trims it, so does herd


def test_math_prompt_is_lm_evals_minerva_math_prompt():
    """lm-eval's ``minerva_math``: first_n of ``list_fewshot_samples()`` (read from its source: importing it needs
    antlr4-python3-runtime 4.11, while math-verify pins 4.13), each ``doc_to_text`` + " " + solution, joined by
    "\\n\\n", then ``doc_to_text`` = "Problem:\\n" + problem + "\\n\\nSolution:". herd's 4-shot prompt is that text."""
    import ast

    from lm_eval import tasks as lm_tasks

    source = (__import__("pathlib").Path(lm_tasks.__file__).parent / "minerva_math" / "utils.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    samples = ast.literal_eval(fn.body[-1].value)
    assert len(samples) == 4
    doc_to_text = lambda doc: "Problem:" + "\n" + doc["problem"] + "\n\n" + "Solution:"  # noqa: E731
    assert 'return "Problem:" + "\\n" + doc["problem"] + "\\n\\n" + "Solution:"' in source
    rows = [json.loads(line) for line in (DATA / "math" / "math500_test.jsonl").read_text().splitlines()]
    by_id = {it.id: it for it in build_task("math500", DATA).items}
    assert len(rows) == len(by_id) == 500
    for row in rows:
        theirs = "".join(doc_to_text(s) + " " + s["solution"] + "\n\n" for s in samples) + doc_to_text(row)
        assert by_id[row["unique_id"]].prompt == theirs


def test_humaneval_prompt_stops_and_program_are_lm_evals_humaneval():
    """lm-eval's ``humaneval``: the prompt is the problem's ``prompt``, generation stops at the same five sequences,
    and code_eval runs ``prompt + completion`` + "\\n" + ``test + "\\ncheck(entry_point)"`` (herd adds a final
    newline). Its ``code_eval`` metric itself is not run here (``evaluate.load`` fetches it from the Hub)."""
    import yaml
    from lm_eval import tasks as lm_tasks

    from herd.eval.tasks.humaneval import STOP, load, program

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    path = __import__("pathlib").Path(lm_tasks.__file__).parent / "humaneval" / "humaneval.yaml"
    cfg = yaml.load(path.read_text(), Loader=Loader)
    assert tuple(cfg["generation_kwargs"]["until"]) == STOP
    assert cfg["doc_to_text"] == "{{prompt}}" and cfg["num_fewshot"] == 0
    spec = build_task("humaneval", DATA)
    assert len(spec.items) == 164
    for item, problem in zip(spec.items, load(DATA)):
        assert item.prompt == problem["prompt"]
        completion = "    return 1\n"
        reference = problem["test"] + f"\ncheck({problem['entry_point']})"
        assert program(problem, completion) == (problem["prompt"] + completion) + "\n" + reference + "\n"
