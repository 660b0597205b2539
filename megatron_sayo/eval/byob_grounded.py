"""The `grounded` benchmark, defined with nemo-evaluator's BYOB (bring-your-own-benchmark) decorators.

The driver (`python -m megatron_sayo.eval`) writes a BYOB dataset (see `byob_rows`) from a grounded JSONL and
compiles this module with nemo-evaluator's BYOB compiler. nemo-evaluator's runner renders PROMPT per row and
sends it as one text message; the image travels inside it as `<image_url>PATH</image_url>`, which our server
turns into an image part (openai_api.py). The scorer extracts the answer from \\boxed{} / <answer> and matches
it with our accuracy reward.
"""

from __future__ import annotations

import os

from nemo_evaluator.contrib.byob import ScorerInput, benchmark, scorer

from megatron_sayo.rl.rewards import accuracy_reward, extract_answer

NAME = "sayo-grounded"
TASK = "sayo_grounded"   # BYOB's normalised name
PROMPT = "<image_url>{image_url}</image_url>{question}\n{instruction}"
DATASET_ENV = "SAYO_GROUNDED_BYOB_DATASET"


def byob_rows(samples, instruction: str, match: str, answer_field: str = "answer") -> list[dict]:
    """BYOB dataset rows for grounded samples: the fields PROMPT needs, the target (`answer`, or `short_answer`
    where a row has one, as the training reward's reward.accuracy_target) and our metadata."""
    rows = []
    for s in samples:
        if s.image_path is None:
            raise ValueError(f"sample {s.id}: the grounded benchmark needs images as files (JSONL), not bytes")
        rows.append({"id": s.id, "image_url": str(s.image_path.resolve()), "question": s.question,
                     "instruction": instruction, "answer": s.reference(answer_field), "boxes": s.boxes, "match": match})
    return rows


def prompt_text(row: dict) -> str:
    """The exact text nemo-evaluator sends for a row (used again for the TAS pass)."""
    return PROMPT.format(**row)


@benchmark(name=NAME, dataset=os.environ.get(DATASET_ENV, "grounded_byob.jsonl"), prompt=PROMPT,
           target_field="answer", endpoint_type="chat")
@scorer
def grounded_score(sample: ScorerInput) -> dict:
    """correct: the extracted answer matches the target; answered: an answer could be extracted."""
    pred = extract_answer(sample.response or "")
    mode = sample.metadata.get("match", "normalized")
    return {"correct": accuracy_reward(pred, str(sample.target), mode) == 1.0, "answered": pred is not None}
