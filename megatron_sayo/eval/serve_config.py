"""The HTTP server's limits and their defaults (python -m megatron_sayo.eval.serve and its request parser)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Defaults of every server limit (each one a --flag of the same name; README "Security and limits")."""

    host: str = "127.0.0.1"                 # loopback unless told otherwise
    max_batch: int = 32                     # most requests generated together
    max_tokens_limit: int = 4096            # largest max_tokens a request may ask for
    default_max_tokens: int = 256           # max_tokens when a request gives none
    max_images_per_request: int = 8         # counted before any image is decoded
    max_image_pixels_factor: int = 4        # --max-image-pixels default: this x the processor's max_pixels
    max_prompt_chars: int = 1_000_000       # characters of message text, checked before tokenizing
    max_body_bytes: int = 64 << 20          # request body; larger ones get 413 before being read
    max_connections: int = 256              # open connections; requests beyond get 503
    backlog: int = 2048                     # listen backlog (the kernel caps it at net.core.somaxconn)
    read_timeout_s: float = 30.0            # a request's headers, and then its body, must arrive within this
    keep_alive_s: float = 5.0               # idle keep-alive connections are closed after this
    max_n: int = 16                         # choices per request
    max_stop: int = 4                       # stop strings per request
    max_top_logprobs: int = 20              # OpenAI's bound


SERVE_DEFAULTS = ServeConfig()
