"""The OpenAI API's requests as the server reads them: validation apart from HTTP (as vLLM keeps
entrypoints/openai/protocol.py beside its server).

read_request() turns a parsed JSON body into a CompletionRequest, or raises ApiError, whose body() is the
OpenAI error object the client gets. Bodies and errors follow the API reference
(https://platform.openai.com/docs/api-reference/chat). Nothing a client sends reaches a traceback.

Structured outputs: a response_format json_schema that is a flat object of string properties is held
token by token (llama_ref.constrain), as the explainer's translation requests need; any other is refused.

torch is never imported here: the model's tokenizer and chat template come in with `llama`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llama_ref.constrain import JsonFieldsConstraint

ROLES = ("system", "user", "assistant")
# Fields whose meaning this server would otherwise silently drop: refused instead.
UNSUPPORTED_FIELDS = ("stop", "logprobs", "tools", "echo", "suffix")
TEXT_COMPLETION_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's documented default
GREEDY = (0.0, 1.0, None)  # (temperature, top_p, seed) of every temperature-0 request: top_p and seed don't matter
# A token of these vocabularies is at most a few dozen bytes, so a prompt this many times longer in bytes
# than the context cannot fit: it is refused before tokenising it costs anything.
MAX_BYTES_PER_TOKEN = 64
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


class ApiError(Exception):
    """An error the client gets as an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """A valid request, ready for the engine: its prompt's tokens and how to answer."""

    kind: str  # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    constraint: JsonFieldsConstraint | None  # for a json_schema response_format
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def read_request(kind: str, body: dict, llama, model_name: str) -> CompletionRequest:
    """Check a request of `kind` for the model `llama`, served as `model_name`, and tokenize its prompt."""
    model = body.get("model")
    if model != model_name:
        if not isinstance(model, str) or not model:
            raise ApiError(f"'model' is required; this server serves {model_name!r}", "model")
        raise ApiError(
            f"model {model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
            "model",
            status=404,
            code="model_not_found",
        )
    check_supported(body)
    temperature, top_p, seed = sampling_of(body)
    shape = answer_shape(body)
    max_seq_len = llama.model.max_seq_len
    check_size(body, kind, max_seq_len)
    if kind == "chat":
        prompt, prompt_field, default = chat_prompt(llama, body), "messages", None
    else:
        prompt, prompt_field, default = text_prompt(llama, body), "prompt", TEXT_COMPLETION_DEFAULT_MAX_TOKENS
    max_tokens = fit_max_tokens(body, len(prompt), max_seq_len, prompt_field, default)
    constraint = None
    if shape is not None:
        from llama_ref.constrain import JsonFieldsConstraint

        constraint = JsonFieldsConstraint(shape, llama.tokenizer, llama.model.params.vocab_size, max_tokens)
        if max_tokens < constraint.closing_bytes:
            # The constraint closes the object within the budget taking a byte per token at worst; under that,
            # no token would be allowed, the engine would drop the constraint and the answer would be prose.
            name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
            raise ApiError(
                f"the response_format's shortest JSON object takes up to {constraint.closing_bytes} "
                f"tokens, more than {name}={max_tokens} allows; raise {name} or leave response_format "
                "out",
                name,
            )
    options = body.get("stream_options")
    return CompletionRequest(
        kind,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        constraint,
        stream=flag(body, "stream"),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )


# ------------------------------------------------------------------------------------------ fields


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(f"'{name}' must be a number from {low:g} to {high:g}; got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise ApiError(f"'{name}' must be an integer {allowed}; got {value!r}", name)
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(f"'{name}' must be true or false; got {value!r}", name)
    return bool(value)


def sampling_of(body: dict) -> tuple:
    """(temperature, top_p, seed), OpenAI's defaults where absent; every greedy request looks the same."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    seed = _integer(body, "seed", 0, 2**64 - 1)  # the range torch.Generator.manual_seed takes
    return (temperature, top_p, seed) if temperature > 0 else GREEDY


def check_supported(body: dict) -> None:
    for name in UNSUPPORTED_FIELDS:
        if body.get(name):
            raise ApiError(f"'{name}' is not supported by this server; leave it out", name)
    if body.get("n") not in (None, 1):
        raise ApiError(f"only n=1 is supported (got n={body['n']!r}); send one request per answer", "n")


def answer_shape(body: dict):
    """The JSON answer a request's response_format asks for, as llama_ref.constrain.JsonFields, or None.

    What the engine can hold a model to is a flat object of string properties, every one required and no
    others (what the explainer's openai backend sends for a translation): such a json_schema is decoded under
    that constraint. Any other format is refused with 400, so a client can send the request again without it
    rather than get an answer that was never held to its schema."""
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return None
    unsupported = ApiError(
        "'response_format' is not supported here except as a json_schema whose schema is an "
        "object of string properties, all required and no others; leave it out",
        "response_format",
    )
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("json_schema"), dict):
        raise unsupported
    schema = fmt["json_schema"].get("schema")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if (
        not isinstance(properties, dict)
        or not properties
        or schema.get("type") != "object"
        or schema.get("additionalProperties") is not False
        or sorted(schema.get("required") or ()) != sorted(properties)
        or any(value != {"type": "string"} for value in properties.values())
    ):
        raise unsupported
    from llama_ref.constrain import JsonFields

    return JsonFields(keys=tuple(properties), markers=((),) * len(properties))


# ------------------------------------------------------------------------------------------ prompts


def chat_prompt(llama, body: dict) -> list[int]:
    """The tokens of the request's messages, rendered with the model's own chat template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError('\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects', "messages")
    dialog = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        role = "system" if role == "developer" else role  # the API's newer name for the system role
        if role not in ROLES:
            raise ApiError(
                f"messages[{index}].role must be one of {', '.join(ROLES)}; got {role!r}", f"messages[{index}].role"
            )
        dialog.append({"role": role, "content": _text_content(message.get("content"), index)})
    from llama_ref.chat import chat_tokens

    try:  # a message's text is text: a special token's name in it is no control token (chat_tokens)
        return chat_tokens(llama.chat_template, llama.tokenizer, dialog)
    except ValueError as exc:  # chat.ChatTemplateError: its message starts with "chat template"
        raise ApiError(f"the model's {exc}", "messages") from None


def _text_content(content, index: int) -> str:
    if isinstance(content, str):
        return content
    # the API also allows a list of parts; this model reads only text parts
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise ApiError(
        f"messages[{index}].content must be a string or a list of text parts; this model reads text only",
        f"messages[{index}].content",
    )


def text_prompt(llama, body: dict) -> list[int]:
    """The tokens of a plain completion request's prompt, with BOS where the model wants it."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    return llama.tokenizer.encode(prompt, bos=llama.tokenizer.add_bos, eos=False)


def fit_max_tokens(body: dict, prompt_length: int, max_seq_len: int, prompt_field: str, default: int | None) -> int:
    """The request's max_completion_tokens or max_tokens (else `default`, else as many as fit),
    checked against the context length."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested = _integer(body, name, 1)
    requested = default if requested is None else requested
    room = max_seq_len - prompt_length
    limit = f"this model's maximum context length is {max_seq_len} tokens (the server's --max-seq-len)"
    if requested is None and room < 1:
        raise ApiError(
            f"{limit}, and the {prompt_field} alone take {prompt_length}; shorten the {prompt_field}",
            prompt_field,
            code="context_length_exceeded",
        )
    if requested is not None and requested > room:
        raise ApiError(
            f"{limit}, but the request needs {prompt_length + requested}: {prompt_length} in the "
            f"{prompt_field} and {requested} for the completion; shorten the {prompt_field} or "
            f"lower {name}",
            name,
            code="context_length_exceeded",
        )
    return room if requested is None else requested


def check_size(body: dict, kind: str, max_seq_len: int) -> None:
    """Refuse, before tokenising, a prompt that cannot fit the context whatever its tokens are."""
    if kind == "chat":
        messages = body.get("messages")
        parts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        size = sum(len(p) if isinstance(p, str) else len(json.dumps(p)) for p in parts)
        field = "messages"
    else:
        prompt = body.get("prompt")
        size, field = (len(prompt) if isinstance(prompt, str) else 0), "prompt"
    if size > max_seq_len * MAX_BYTES_PER_TOKEN:
        raise ApiError(
            f"the {field} hold {size} characters, far more than this model's context of {max_seq_len} "
            f"tokens can take; shorten them",
            field,
            code="context_length_exceeded",
        )


# ------------------------------------------------------------------------------------------ bodies

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object of valid text."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise ApiError("the request body nests too deeply; send a flat JSON object") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(body).__name__}")
    # "\ud800" is valid JSON but not text: no tokenizer can encode it. The raw bytes are UTF-8 already, so a
    # lone surrogate can only come as a \uD8xx..\uDFxx escape: only then is the body checked whole.
    if not _SURROGATE_ESCAPE.search(raw):
        return body
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            'the request body holds an unpaired surrogate (like "\\ud800"); send valid Unicode text'
        ) from None
    except RecursionError:
        raise ApiError("the request body nests too deeply; send a flat JSON object") from None
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
