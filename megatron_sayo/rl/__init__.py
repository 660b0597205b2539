"""GRPO training: rewards, advantages, loss, update, optimizer, metrics, held-out evaluation and the trainer."""
