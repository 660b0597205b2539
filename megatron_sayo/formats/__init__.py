"""File formats read and written without torch: safetensors headers, torch.save records, DCP metadata, byte copies.

Nothing in this package imports torch (tests/formats checks it with torch blocked): a converter starts in a tenth
of a second (importing torch takes 1.3 s) and copies tensor bytes in-kernel.
"""
