"""Chat templates: render the model's own Jinja template (sandboxed as transformers does, and
bounded in time and size: zlocal.inference.template_sandbox) and check at load time that it renders and ends
assistant turns with a token the runtime can stop on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from zlocal.errors import InvalidArgumentError, TemplateError
from zlocal.inference.template_sandbox import TemplateLimitError, render_template

ROLES = ("system", "user", "assistant")
_PROBE_USER = "zlocal-probe-user"
_PROBE_ASSISTANT = "zlocal-probe-assistant"


def zephyr_template() -> str:
    """Return the built-in Zephyr chat template (HuggingFaceH4/zephyr-7b-beta's own)."""
    return resources.files("zlocal").joinpath("data/zephyr.jinja").read_text(encoding="utf-8")


def is_zephyr_family(name: str, config: Any) -> bool:
    """True for checkpoints of the Zephyr family (Mistral-7B fine-tunes published as zephyr-*)."""
    # Basenames only: a parent directory named "zephyr-work" says nothing about the model.
    names = [name, str(getattr(config, "_name_or_path", "") or "")]
    hay = " ".join(Path(n.rstrip("/")).name for n in names).lower()
    return "zephyr" in hay and getattr(config, "model_type", "") == "mistral"


def message_objects(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts; InvalidArgumentError for anything but a non-empty list of
    objects (naming the first entry that is not one)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidArgumentError(f"messages[{i}] must be an object with 'role' and 'content'")
    return list(messages)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check a chat transcript's shape and return it as plain role/content dicts.

    Raises InvalidArgumentError for an empty list, unknown roles or non-string content.
    """
    out = []
    for i, msg in enumerate(message_objects(messages)):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise InvalidArgumentError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def load_messages_file(path: str | Path) -> list[dict[str, str]]:
    """Read a JSON file holding a list of messages (or {"messages": [...]})."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"messages file {p.name} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"messages file {p.name} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    return validate_messages(data)


def render_chat_template(source: str, context: dict[str, Any], origin: str = "file") -> str:
    """Render a chat template the way ``tokenizer.apply_chat_template`` does (same sandbox, same
    variables), within zlocal's time and size bounds.

    ``context`` holds what the template sees: messages, add_generation_prompt, tools, documents
    and the tokenizer's special tokens. Raises TemplateError (TemplateLimitError past a bound).
    """
    try:
        return render_template(source, context)
    except TemplateLimitError as exc:
        raise TemplateLimitError(f"chat template ({origin}) stopped: {exc}") from exc
    except TemplateError:
        raise
    except Exception as exc:  # Jinja syntax/runtime errors, raise_exception, sandbox refusals
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        raise TemplateError(f"chat template ({origin}) failed to render: {text[:300]}") from exc


@dataclass
class ChatTemplate:
    """A validated chat template bound to a tokenizer, with the token ids that end a turn."""

    tokenizer: Any
    source: str
    origin: str  # "checkpoint", "builtin-zephyr" or "file"
    stop_token_ids: list[int] = field(default_factory=list)
    supports_system: bool = True

    @property
    def supports_tools(self) -> bool:
        """The template renders tool definitions itself (its source reads the ``tools`` variable);
        otherwise zlocal.inference.tools writes them into the system message."""
        return re.search(r"\btools\b", self.source) is not None

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render messages to the exact prompt string the runtime feeds the model."""
        msgs = validate_messages(messages)
        if not self.supports_system and msgs[0]["role"] == "system":
            # Templates without a system role (Mistral-instruct style) get it folded into the first user turn.
            sys_text, rest = msgs[0]["content"], msgs[1:]
            if rest and rest[0]["role"] == "user":
                rest = [{"role": "user", "content": sys_text + "\n\n" + rest[0]["content"]}, *rest[1:]]
            msgs = rest or [{"role": "user", "content": sys_text}]
        context = {
            **(getattr(self.tokenizer, "special_tokens_map", None) or {}),
            "messages": msgs,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        return render_chat_template(self.source, context, self.origin)

    def render_tools(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
        """Render a tool conversation with the template's own tool support: ``tools`` are OpenAI
        tool objects, messages may hold assistant ``tool_calls`` and ``tool`` results."""
        context = {
            **(getattr(self.tokenizer, "special_tokens_map", None) or {}),
            "messages": [dict(m) for m in messages],
            "tools": tools or None,
            "documents": None,
            "add_generation_prompt": True,
        }
        return render_chat_template(self.source, context, self.origin)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of an already rendered prompt (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize; ids equal ``tokenizer.apply_chat_template(..., tokenize=True)``."""
        text = self.render(messages, add_generation_prompt)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            ids.add(tokenizer.convert_tokens_to_ids(tok.content))
    return ids


def build_template(
    tokenizer: Any,
    model_name: str,
    config: Any,
    eos_token_ids: Sequence[int],
    override: str | Path | None = None,
) -> ChatTemplate:
    """Pick the chat template (override file, checkpoint's own, or built-in Zephyr) and validate it.

    Raises TemplateError when there is no template, it fails to render, or assistant turns end
    without a special token the runtime can stop on.
    """
    if override is not None:
        try:
            source, origin = Path(override).read_text(encoding="utf-8"), "file"
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"cannot read chat template file {Path(override).name}: {exc}") from exc
    elif getattr(tokenizer, "chat_template", None):
        source, origin = tokenizer.chat_template, "checkpoint"
        if isinstance(source, dict):  # named templates: use the default one
            source = source.get("default") or next(iter(source.values()))
    elif is_zephyr_family(model_name, config):
        source, origin = zephyr_template(), "builtin-zephyr"
    else:
        raise TemplateError(
            f"{model_name} has no chat template in its tokenizer config; pass --chat-template FILE.jinja"
        )

    tpl = ChatTemplate(tokenizer=tokenizer, source=source, origin=origin)
    # A probe conversation that continues after the assistant turn, so templates that only close
    # a turn when another follows are judged fairly.
    probe = [
        {"role": "user", "content": _PROBE_USER},
        {"role": "assistant", "content": _PROBE_ASSISTANT},
        {"role": "user", "content": _PROBE_USER + "-2"},
    ]
    rendered = tpl.render(probe, add_generation_prompt=False)
    if _PROBE_USER not in rendered or _PROBE_ASSISTANT not in rendered:
        raise TemplateError(f"chat template ({origin}) drops message content; it cannot be used for chat")
    try:
        with_sys = tpl.render([{"role": "system", "content": "zlocal-probe-system"}, *probe[:2]], False)
        tpl.supports_system = "zlocal-probe-system" in with_sys
    except TemplateLimitError:
        raise  # a template that hangs or balloons on a system turn is hostile, not system-less
    except TemplateError:
        tpl.supports_system = False

    # What follows the assistant's content must hold a special token: that is the end-of-turn
    # marker the model learned to emit, and what generation stops on.
    tail = rendered.split(_PROBE_ASSISTANT, 1)[1].split(_PROBE_USER + "-2", 1)[0]
    tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    specials = _special_ids(tokenizer)
    stops = [int(i) for i in eos_token_ids if i is not None]
    end_of_turn = next((i for i in tail_ids if i in specials), None)
    if end_of_turn is None:
        raise TemplateError(
            f"chat template ({origin}) ends assistant turns with {tail[:24]!r}, which holds no special "
            "token to stop on; fix the template or the tokenizer's special tokens"
        )
    stops.append(int(end_of_turn))
    if not stops:
        raise TemplateError("the tokenizer has no EOS token and the template no end-of-turn token to stop on")
    tpl.stop_token_ids = sorted(set(stops))
    return tpl
