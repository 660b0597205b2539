"""File formats read and written without torch: safetensors headers, torch.save records, DCP metadata, byte copies.

Nothing in this package imports torch (tests/formats checks it with torch blocked).
"""
