"""Training and evaluation data: images, tokenizer and chat template, grounded datasets, regions, paper sources."""
