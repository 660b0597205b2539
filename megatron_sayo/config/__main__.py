"""`python -m megatron_sayo.config FILE [key.sub=value ...]`: validate a config and print it resolved (exit status 2
on a bad config); `--markdown` prints the reference docs/config.md."""

import sys

import yaml

from megatron_sayo.config.loader import load_config
from megatron_sayo.config.reference import reference_markdown
from megatron_sayo.config.schema import ConfigError


def main(argv: list[str] | None = None) -> int:
    """Validate a config file with overrides and print the resolved config as YAML."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        print(reference_markdown(), end="")
        return 0
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m megatron_sayo.config FILE [section.key=value ...]\n"
              "       python -m megatron_sayo.config --markdown   (the reference docs/config.md)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
