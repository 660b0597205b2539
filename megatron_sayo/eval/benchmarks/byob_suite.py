"""The nine suite benchmarks as nemo-evaluator BYOB benchmarks (`sayo-<name>`, task `sayo_<name>`).

All share the authors' message layout: their system prompt, then a user turn holding the image followed by the
question text (the image travels as `<image_url>PATH</image_url>`, see openai_api.py), and their scorer. The
dataset path is given per run (config.params.extra.dataset.path) by eval/benchmarks/run.py.
"""

from __future__ import annotations

from nemo_evaluator.contrib.byob import ScorerInput, benchmark, scorer

from megatron_sayo.config import SuiteConfig
from megatron_sayo.eval.benchmarks.scoring import is_correct
from megatron_sayo.eval.benchmarks.suite import BENCHMARKS

PROMPT = "<image_url>{image_url}</image_url>{question}"


def template(text: str) -> str:
    """`text` as a str.format template that renders to itself (BYOB formats the system prompt with row fields)."""
    return text.replace("{", "{{").replace("}", "}}")


@scorer
def suite_score(sample: ScorerInput) -> dict:
    """correct: the authors' verdict; answered: the response was not empty."""
    response = (sample.response or "").strip()
    return {"correct": is_correct(response, sample.target), "answered": bool(response)}


for _b in BENCHMARKS:
    benchmark(name=f"sayo-{_b.name}", dataset=f"{_b.name}.jsonl", prompt=PROMPT, target_field="answer",
              endpoint_type="chat", system_prompt=template(SuiteConfig().system_prompt))(suite_score)
