"""Generation shared by rollouts, held-out evaluation, serving, tools and benchmarks: sampling, decode, capture."""
