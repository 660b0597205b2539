"""Training checkpoints: dist_checkpointing model/optimizer/RNG state (`state`), and the torch-free directory
conventions (`files`: metadata, side files, atomic publish, resume order)."""
