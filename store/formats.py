"""Record formats: detect what one parsed record is and normalise it to the internal form.

The internal form is either a chat, a list of `{"role", "content"}` messages with roles
system/user/assistant (an assistant message may carry `"weight": 0`: shown, not learned,
as in OpenAI's fine-tuning format), or plain text for continued pre-training. Detection is
per record, so one file may mix formats:

    {"messages": [...]}                          OpenAI chat fine-tuning
    {"conversations": [{"from", "value"}...]}    ShareGPT (human, gpt, chatgpt, bing, bard, ...)
    {"instruction", "input"?, "output"}          Alpaca
    {"prompt", "completion"}                     prompt/completion (strings or message lists)
    {"question", "answer"}                       the same, other names (common in CSVs)
    {"text"}                                     continued pre-training text

Every problem raises RecordError with a reason meant for the user.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from evertune.store.errors import RecordError

CHAT = "chat"
TEXT = "text"

# Role names seen in real dumps (ARCHITECTURE.md, "Platform facts"), mapped onto the three
# roles we train on.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
_CANONICAL_ROLES = frozenset({"system", "user", "assistant"})
SHAPES = (
    "messages | conversations | instruction+output | prompt+completion | question+answer | text"
)


def prompt_hash(messages: list[dict]) -> bytes:
    """blake2b-128 of the question a chat asks: the messages before its last assistant turn,
    without system prompts, each content with its whitespace collapsed and case folded. Two
    examples with the same question and different answers are the question answered twice
    (the newer answer supersedes the older, store.ingest) and `evertune forget` removes both,
    whatever system prompt, record format or spelling each came with (issue 24: a fact
    taught under "You are a helpful assistant." outlived its forget and its correction)."""
    last = len(messages) - 1
    while messages[last]["role"] != "assistant":
        last -= 1
    question = [
        (m["role"], " ".join(m["content"].split()).casefold())
        for m in messages[:last]
        if m["role"] != "system"
    ]
    return hashlib.blake2b(orjson.dumps(question), digest_size=16, person=b"question").digest()


def text_hash(text: str) -> bytes:
    """The prompt_hash of a text chunk: its words, case folded, so `evertune forget --file`
    finds a document's chunks as it finds a chat file's questions."""
    folded = " ".join(text.split()).casefold().encode()
    return hashlib.blake2b(folded, digest_size=16, person=b"text").digest()


def question_hash(question: str) -> bytes:
    """The prompt_hash of every chat asking `question` alone (no earlier turns)."""
    return prompt_hash(
        [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
    )


def asked_hashes(messages: list[dict]) -> set[bytes]:
    """Every question a chat asks: its prompt's hash, and each user turn before its last
    answer as a question of its own (asked in the middle of a conversation)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {prompt_hash(messages)} | {
        question_hash(m["content"]) for m in messages[:last] if m["role"] == "user"
    }


def normalise(record: Any, max_chars: int) -> tuple[str, list[dict] | str, int]:
    """(kind, body, characters) of one parsed record; RecordError says why it is unusable."""
    if not isinstance(record, dict):
        raise RecordError(f"record is a JSON {_type_name(record)}, expected an object")
    if "messages" in record:
        fast = _fast_chat(record["messages"])
        if fast is not None:
            body, chars = fast
            if chars > max_chars:
                raise RecordError(_too_long(chars, max_chars))
            return CHAT, body, chars
        kind, body = CHAT, _chat(record["messages"], "messages", "role", "content")
    elif "conversations" in record:
        kind, body = CHAT, _sharegpt(record)
    elif "instruction" in record:
        kind, body = CHAT, _alpaca(record)
    elif "prompt" in record and "completion" in record:
        kind, body = CHAT, _prompt_completion(record["prompt"], record["completion"], record)
    elif "question" in record and "answer" in record:
        kind, body = CHAT, _prompt_completion(record["question"], record["answer"], record)
    elif "text" in record:
        kind, body = TEXT, _text(record["text"], "text")
    else:
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise RecordError(f"unrecognised record (keys: {keys}); expected one of: {SHAPES}")
    chars = len(body) if kind == TEXT else sum(len(m["content"]) for m in body)
    if chars > max_chars:
        raise RecordError(_too_long(chars, max_chars))
    return kind, body, chars


def _too_long(chars: int, max_chars: int) -> str:
    return (
        f"over the length limit: {chars} characters > {max_chars} (config key"
        " ingest.max_example_chars)"
    )


def _fast_chat(messages: Any) -> tuple[list[dict], int] | None:
    """The common, already-clean OpenAI chat record, without the per-field checks.

    Returns None for anything unusual (odd role spelling, content parts, weights, a missing
    assistant turn, empty content ...): `_chat` then normalises it or says what is wrong.
    Ingestion speed is dominated by this function (benchmarks/ingest.py).
    """
    if type(messages) is not list:
        return None
    out, chars, learned = [], 0, False
    roles = _CANONICAL_ROLES
    for msg in messages:
        if type(msg) is not dict or len(msg) != 2:
            return None
        role, content = msg.get("role"), msg.get("content")
        # `type(role) is str` first: a list or object role is unhashable (TypeError on `in`).
        if (
            type(role) is not str
            or role not in roles
            or type(content) is not str
            or not content
            or content.isspace()
        ):
            return None
        learned = learned or role == "assistant"
        chars += len(content)
        out.append({"role": role, "content": content})
    return (out, chars) if learned else None


def _a(value: Any) -> str:
    """'an array', 'a string', 'null' ...: the JSON type of `value` for a message."""
    name = _type_name(value)
    return name if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _type_name(value: Any) -> str:
    return {
        list: "array",
        str: "string",
        int: "number",
        float: "number",
        bool: "boolean",
        dict: "object",
    }.get(type(value), "null" if value is None else type(value).__name__)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"'{field}' is {_a(value)}, expected a string")
    if not value.strip():
        raise RecordError(f"empty content in '{field}'")
    return value


def _content(value: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RecordError(f"{where}: content part of type '{kind}' is not supported")
            parts.append(part.get("text"))
        value = "".join(p for p in parts if isinstance(p, str))
    if not isinstance(value, str):
        raise RecordError(f"{where}: content is {_a(value)}, expected a string")
    if not value.strip():
        raise RecordError(f"{where}: empty content")
    return value


def _chat(messages: Any, field: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(messages, list):
        raise RecordError(f"'{field}' is {_a(messages)}, expected an array")
    if not messages:
        raise RecordError(f"empty conversation: '{field}' has no messages")
    out = []
    learned = False
    for i, msg in enumerate(messages, 1):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise RecordError(f"{where} is {_a(msg)}, expected an object")
        raw_role = msg.get(role_key)
        role = ROLE_NAMES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(
                f"{where}: unknown role {raw_role!r} (known: {', '.join(ROLE_NAMES)})"
            )
        norm = {"role": role, "content": _content(msg.get(content_key), where)}
        if role == "assistant":
            if msg.get("weight", 1) == 0:
                norm["weight"] = 0
            else:
                learned = True
        out.append(norm)
    if not learned:
        raise RecordError("missing assistant turn: nothing to learn from in this conversation")
    return out


def _sharegpt(record: dict) -> list[dict]:
    conv = record["conversations"]
    # Some dumps use role/content inside `conversations`; accept both spellings.
    if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "from" not in conv[0]:
        body = _chat(conv, "conversations", "role", "content")
    else:
        body = _chat(conv, "conversations", "from", "value")
    system = record.get("system")
    if isinstance(system, str) and system.strip() and body[0]["role"] != "system":
        body.insert(0, {"role": "system", "content": system})
    return body


def _alpaca(record: dict) -> list[dict]:
    if "output" not in record:
        raise RecordError("Alpaca record without 'output': nothing to learn from")
    instruction = _text(record["instruction"], "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f"'input' is {_a(extra)}, expected a string")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _with_system(
        record,
        [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record["output"], "output")},
        ],
    )


def _prompt_completion(prompt: Any, completion: Any, record: dict) -> list[dict]:
    if isinstance(prompt, list) or isinstance(completion, list):
        # TRL's conversational prompt/completion: two message lists.
        body = _chat(
            _as_list(prompt) + _as_list(completion), "prompt+completion", "role", "content"
        )
        return body
    names = ("question", "answer") if "question" in record else ("prompt", "completion")
    return _with_system(
        record,
        [
            {"role": "user", "content": _text(prompt, names[0])},
            {"role": "assistant", "content": _text(completion, names[1])},
        ],
    )


def _as_list(value: Any) -> list:
    if isinstance(value, list):
        return value
    raise RecordError("prompt and completion must both be strings or both message arrays")


def _with_system(record: dict, body: list[dict]) -> list[dict]:
    system = record.get("system")
    if system is None or system == "":
        return body
    return [{"role": "system", "content": _text(system, "system")}, *body]
