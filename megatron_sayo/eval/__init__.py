"""Evaluation: the OpenAI-compatible server, the nemo-evaluator driver, the grounded benchmark, the paper's nine."""
