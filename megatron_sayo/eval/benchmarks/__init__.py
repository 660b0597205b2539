"""The SAYO authors' nine-benchmark evaluation suite (docs/eval.md): hub datasets read from local directories,
the authors' prompts and scoring rules, run through nemo-evaluator's bring-your-own-benchmark runner."""
