"""HF <-> Megatron checkpoint conversion as planned byte moves: one process, no model, no torch."""
