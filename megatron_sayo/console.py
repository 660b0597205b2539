"""What a run prints: this project's lines always; other libraries' known noise (megatron's per-bucket parameter
lists and config dumps, Apex / Transformer Engine / CUDA warnings) only at log level info or debug."""

from __future__ import annotations

import logging
import warnings

LEVELS = ("debug", "info", "warning", "error")

# Warnings every CPU (or TE-less) run gets from libraries, each harmless here: (message regex, why it is noise).
KNOWN_NOISE: tuple[tuple[str, str], ...] = (
    (r"Apex is not installed", "megatron falls back to torch's norm, which this project uses on purpose"),
    (r".*CUDA_DEVICE_MAX_CONNECTIONS", "a GPU overlap hint; the launch scripts set it where it matters"),
    (r".*Transformer Engine", "TE is the optional GPU layer backend (model.layer_backend: te)"),
    (r".*CUDA_HOME", "no CUDA toolkit on a CPU machine"),
    (r"full scope is deprecated", "megatron's own default for CUDA graphs, unused here"),
    (r"`load_state_dict` is deprecated", "megatron's checkpoint loader calls torch's older name"),
    (r"Please use DTensor instead", "torch's note to megatron about ShardedTensor, in every checkpoint load"),
)
LIBRARIES = ("megatron", "torch", "transformers", "nemo_evaluator", "httpx", "uvicorn", "urllib3", "PIL",
             "matplotlib", "datasets")


def setup(level: str = "warning") -> None:
    """Configure logging for a command: this project's loggers at INFO, other libraries' at `level`, and the
    KNOWN_NOISE warnings hidden unless `level` is info or debug."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(numeric)
    logging.getLogger("megatron_sayo").setLevel(min(numeric, logging.INFO))
    if numeric >= logging.WARNING:
        for pattern, _why in KNOWN_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
