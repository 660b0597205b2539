"""A checkpoint's chat template, found where any transformers version saves it, rendered as transformers does.

transformers 5.x writes `chat_template.jinja`; 4.43-4.57 wrote `chat_template.json` ({"chat_template": ...}) for
processors; older tokenizers keep it in `tokenizer_config.json` ("chat_template"; a string, or a list of
{"name", "template"} of which "default" is used). The first found in that order wins, as in transformers. The
template is untrusted text: it runs in jinja2's immutable sandbox (transformers' choice too), with the same
whitespace options (trim_blocks, lstrip_blocks) and helpers (raise_exception, tojson, loop controls).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_sayo.formats.jsonfiles import read_json


class ChatTemplateError(ValueError):
    """A chat template file that cannot be read or rendered; the message names the file."""


@dataclass(frozen=True)
class ChatTemplate:
    """Template text and the file it came from."""

    text: str
    source: str

    def render(self, messages: list[dict], add_generation_prompt: bool = False, add_vision_id: bool = False) -> str:
        """The prompt text for `messages` (one <|image_pad|> per image item, as the Qwen2.5-VL template writes)."""
        try:
            return _compile(self.text).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              add_vision_id=add_vision_id)
        except Exception as exc:   # jinja2 raises many types for template bugs; the sandbox for unsafe access
            raise ChatTemplateError(f"{self.source}: cannot render the chat template: {type(exc).__name__}: "
                                    f"{exc}") from None


def _raise(message: str):
    raise ValueError(message)


_CACHE: dict[str, object] = {}


def _compile(text: str):
    """The jinja2 template (cached per text)."""
    if text not in _CACHE:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise
        _CACHE[text] = env.from_string(text)
    return _CACHE[text]


def _from_json_field(value, source: str) -> str | None:
    """A 'chat_template' value: a string, or a list of named templates (the 'default' one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ChatTemplateError(f"{source}: field 'chat_template' must be a string or a list of named templates with "
                            f"a 'default', got {type(value).__name__}")


def find_chat_template(hf_dir: str | Path) -> ChatTemplate | None:
    """The checkpoint's chat template (chat_template.jinja, chat_template.json, tokenizer_config.json), or None."""
    hf_dir = Path(hf_dir)
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja))
        except UnicodeDecodeError:
            raise ChatTemplateError(f"{jinja}: not UTF-8 text") from None
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = hf_dir / name
        if path.is_file():
            raw = read_json(path, f"a {name}", ChatTemplateError)
            text = _from_json_field(raw.get("chat_template") if isinstance(raw, dict) else None, str(path))
            if text:
                return ChatTemplate(text, str(path))
    return None
