"""Record formats: every supported shape normalises to the internal form, and every
unusable record is refused with a RecordError whose message tells the user what is wrong."""

from __future__ import annotations

import pytest

from evertune.store.errors import RecordError
from evertune.store.formats import CHAT, ROLE_NAMES, TEXT, normalise

LIMIT = 32_000


def chat(record: dict, max_chars: int = LIMIT) -> list[dict]:
    kind, body, chars = normalise(record, max_chars)
    assert kind == CHAT
    assert chars == sum(len(m["content"]) for m in body)
    return body


def rejected(record, max_chars: int = LIMIT) -> str:
    with pytest.raises(RecordError) as info:
        normalise(record, max_chars)
    return str(info.value)


# --- OpenAI chat ---------------------------------------------------------------------------


def test_openai_chat_with_system_and_several_turns_is_kept_in_order():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    kind, body, chars = normalise({"messages": messages}, LIMIT)
    assert kind == CHAT
    assert body == messages
    assert chars == sum(len(m["content"]) for m in messages)


def test_openai_content_part_lists_are_joined_into_one_string():
    record = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
        ]
    }
    assert chat(record) == [
        {"role": "user", "content": "Hello, world"},
        {"role": "assistant", "content": "Hi!"},
    ]


def test_openai_content_part_that_is_not_text_is_rejected_with_its_type():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "A cat."},
        ]
    }
    reason = rejected(record)
    assert reason.startswith("message 1:")
    assert "content part of type 'image_url' is not supported" in reason


def test_assistant_turn_with_weight_zero_is_kept_with_its_weight_and_not_learned_from():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Old answer", "weight": 0},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Better answer", "weight": 1},
        ]
    }
    assert chat(record) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Old answer", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "Better answer"},
    ]


def test_conversation_whose_only_assistant_turns_have_weight_zero_has_nothing_to_learn():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 0},
        ]
    }
    assert "missing assistant turn" in rejected(record)


def test_role_names_are_matched_ignoring_case_and_surrounding_spaces():
    record = {
        "messages": [
            {"role": " USER ", "content": "Hi"},
            {"role": "Assistant", "content": "Hello"},
            {"role": "model", "content": "More"},
        ]
    }
    assert [m["role"] for m in chat(record)] == ["user", "assistant", "assistant"]


def test_extra_message_keys_are_dropped_and_give_the_same_body_as_a_clean_record():
    clean = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    unusual = {
        "messages": [
            {"role": "user", "content": "Hi", "name": "alice"},
            {"role": "assistant", "content": "Hello", "name": "bot"},
        ]
    }
    assert normalise(unusual, LIMIT) == normalise(clean, LIMIT)


# --- prompt/completion and question/answer -------------------------------------------------


def test_prompt_completion_strings_become_one_user_and_one_assistant_turn():
    assert chat({"prompt": "2+2?", "completion": "4"}) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_prompt_completion_with_system_puts_the_system_turn_first():
    assert chat({"system": "Be exact.", "prompt": "2+2?", "completion": "4"}) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_trl_prompt_completion_message_lists_are_concatenated_into_one_conversation():
    record = {
        "prompt": [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "2+2?"},
        ],
        "completion": [{"role": "assistant", "content": "4"}],
    }
    assert chat(record) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_trl_completion_list_without_an_assistant_turn_is_rejected():
    record = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "completion": [{"role": "user", "content": "4"}],
    }
    assert "missing assistant turn" in rejected(record)


def test_prompt_string_with_completion_list_is_rejected_as_mixed_forms():
    reason = rejected({"prompt": "2+2?", "completion": [{"role": "assistant", "content": "4"}]})
    assert reason == "prompt and completion must both be strings or both message arrays"


def test_question_answer_becomes_a_user_and_an_assistant_turn():
    assert chat({"question": "Who wrote Hamlet?", "answer": "Shakespeare."}) == [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "content": "Shakespeare."},
    ]


def test_question_answer_with_system_puts_the_system_turn_first():
    body = chat({"question": "Q?", "answer": "A.", "system": "Answer briefly."})
    assert body[0] == {"role": "system", "content": "Answer briefly."}
    assert [m["role"] for m in body] == ["system", "user", "assistant"]


def test_question_answer_errors_name_the_question_and_answer_fields():
    assert rejected({"question": "Q?", "answer": 42}) == "'answer' is a number, expected a string"
    assert rejected({"question": "  ", "answer": "A"}) == "empty content in 'question'"


# --- Alpaca -----------------------------------------------------------------------------------


def test_alpaca_without_input_uses_the_instruction_as_the_user_turn():
    assert chat({"instruction": "Say hi.", "output": "Hi!"}) == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]


def test_alpaca_with_input_appends_it_to_the_instruction_after_a_blank_line():
    record = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    body = chat(record)
    assert body == [
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]


@pytest.mark.parametrize("empty_input", ["", "   ", None])
def test_alpaca_with_an_empty_input_uses_the_instruction_alone(empty_input):
    body = chat({"instruction": "Say hi.", "input": empty_input, "output": "Hi!"})
    assert body[0] == {"role": "user", "content": "Say hi."}


def test_alpaca_with_system_puts_the_system_turn_first():
    body = chat({"system": "You are polite.", "instruction": "Say hi.", "output": "Hello!"})
    assert body == [
        {"role": "system", "content": "You are polite."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hello!"},
    ]


def test_alpaca_without_output_is_rejected_as_having_nothing_to_learn():
    assert "Alpaca record without 'output'" in rejected({"instruction": "Say hi."})


def test_alpaca_input_of_the_wrong_type_is_rejected_naming_the_field():
    reason = rejected({"instruction": "Add.", "input": 5, "output": "5"})
    assert reason == "'input' is a number, expected a string"


# --- ShareGPT -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("chatgpt", "assistant"),
        ("bing", "assistant"),
        ("bard", "assistant"),
        ("system", "system"),
    ],
)
def test_sharegpt_role_name_maps_onto_the_training_role(name, role):
    first = {"from": name, "value": "first turn"}
    record = {"conversations": [first, {"from": "gpt", "value": "an answer"}]}
    body = chat(record)
    assert body[0] == {"role": role, "content": "first turn"}
    assert body[1] == {"role": "assistant", "content": "an answer"}


def test_sharegpt_multi_turn_conversation_keeps_every_turn_in_order():
    record = {
        "conversations": [
            {"from": "system", "value": "Be kind."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye"},
        ]
    }
    assert [(m["role"], m["content"]) for m in chat(record)] == [
        ("system", "Be kind."),
        ("user", "Hi"),
        ("assistant", "Hello"),
        ("user", "Bye"),
        ("assistant", "Goodbye"),
    ]


def test_sharegpt_with_role_and_content_keys_is_accepted():
    record = {
        "conversations": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert chat(record) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_top_level_system_becomes_the_first_turn():
    record = {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    assert chat(record)[0] == {"role": "system", "content": "Be kind."}


def test_sharegpt_top_level_system_is_not_added_when_the_conversation_has_one():
    record = {
        "system": "Outer.",
        "conversations": [
            {"from": "system", "value": "Inner."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ],
    }
    body = chat(record)
    assert [m["role"] for m in body] == ["system", "user", "assistant"]
    assert body[0]["content"] == "Inner."


def test_sharegpt_unknown_role_is_rejected_with_its_name():
    record = {"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    reason = rejected(record)
    assert reason.startswith("message 1: unknown role 'robot'")
    assert "known: " + ", ".join(ROLE_NAMES) in reason


def test_sharegpt_turn_without_a_role_is_rejected_as_unknown_role_none():
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"value": "Hello"}]}
    assert rejected(record).startswith("message 2: unknown role None")


# --- text -------------------------------------------------------------------------------------


def test_text_record_is_kept_verbatim_for_continued_pretraining():
    text = "  Line one.\n\nLine two.  "
    assert normalise({"text": text}, LIMIT) == (TEXT, text, len(text))


def test_text_is_only_used_when_no_chat_shape_matches():
    kind, _, _ = normalise({"text": "ignored", "prompt": "p", "completion": "c"}, LIMIT)
    assert kind == CHAT


# --- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "name"),
    [
        ([{"role": "user"}], "array"),
        ("hello", "string"),
        (42, "number"),
        (1.5, "number"),
        (True, "boolean"),
        (None, "null"),
    ],
)
def test_record_that_is_not_an_object_is_rejected_naming_its_json_type(record, name):
    assert rejected(record) == f"record is a JSON {name}, expected an object"


def test_record_with_unrecognised_keys_is_rejected_listing_the_keys_and_the_shapes():
    reason = rejected({"foo": 1, "bar": 2})
    assert reason.startswith("unrecognised record (keys: bar, foo)")
    for shape in ("messages", "conversations", "instruction+output", "prompt+completion"):
        assert shape in reason


def test_empty_object_is_rejected_as_unrecognised_with_no_keys():
    assert rejected({}).startswith("unrecognised record (keys: none)")


def test_prompt_without_completion_is_rejected_as_unrecognised():
    assert rejected({"prompt": "p"}).startswith("unrecognised record (keys: prompt)")


def test_openai_chat_unknown_role_is_rejected_with_its_name_and_position():
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "narrator", "content": "Meanwhile"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert rejected(record).startswith("message 2: unknown role 'narrator'")


@pytest.mark.parametrize("content", ["", "   ", "\n\t"])
def test_message_with_empty_content_is_rejected_naming_the_message(content):
    record = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": content},
        ]
    }
    assert rejected(record) == "message 2: empty content"


def test_content_parts_that_join_to_nothing_are_empty_content():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": " "}]},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    assert rejected(record) == "message 1: empty content"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"text": ""}, "empty content in 'text'"),
        ({"text": " \n "}, "empty content in 'text'"),
        ({"prompt": "p", "completion": ""}, "empty content in 'completion'"),
        ({"instruction": "", "output": "o"}, "empty content in 'instruction'"),
        ({"instruction": "i", "output": "  "}, "empty content in 'output'"),
        ({"system": "  ", "prompt": "p", "completion": "c"}, "empty content in 'system'"),
    ],
)
def test_empty_field_is_rejected_naming_the_field(record, reason):
    assert rejected(record) == reason


@pytest.mark.parametrize("field", ["messages", "conversations"])
def test_empty_conversation_is_rejected(field):
    assert rejected({field: []}) == f"empty conversation: '{field}' has no messages"


def test_conversation_without_an_assistant_turn_is_rejected():
    record = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
        ]
    }
    assert rejected(record).startswith("missing assistant turn")


def test_sharegpt_conversation_of_only_human_turns_is_missing_the_assistant_turn():
    record = {"conversations": [{"from": "human", "value": "Hi"}]}
    assert rejected(record).startswith("missing assistant turn")


def test_chat_over_the_length_limit_is_rejected_with_both_numbers_and_the_config_key():
    record = {
        "messages": [
            {"role": "user", "content": "12345"},
            {"role": "assistant", "content": "678901"},
        ]
    }
    reason = rejected(record, max_chars=10)
    assert reason == (
        "over the length limit: 11 characters > 10 (config key ingest.max_example_chars)"
    )


def test_chat_of_exactly_the_length_limit_is_accepted():
    record = {
        "messages": [
            {"role": "user", "content": "12345"},
            {"role": "assistant", "content": "67890"},
        ]
    }
    assert len(chat(record, max_chars=10)) == 2


def test_unusual_chat_over_the_length_limit_is_rejected_too():
    # Content parts take the slow path; the limit applies there as well.
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x" * 8}]},
            {"role": "assistant", "content": "yyyy"},
        ]
    }
    assert rejected(record, max_chars=10).startswith("over the length limit: 12 characters > 10")


@pytest.mark.parametrize(
    "record",
    [
        {"text": "x" * 11},
        {"prompt": "x" * 6, "completion": "y" * 5},
        {"instruction": "x" * 6, "output": "y" * 5},
        {"conversations": [{"from": "human", "value": "x" * 6}, {"from": "gpt", "value": "y" * 5}]},
    ],
)
def test_every_shape_over_the_length_limit_is_rejected(record):
    assert rejected(record, max_chars=10).startswith("over the length limit: 11 characters > 10")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": "hello"}, "'messages' is a string, expected an array"),
        ({"messages": None}, "'messages' is null, expected an array"),
        (
            {"messages": ["hi", {"role": "assistant", "content": "a"}]},
            "message 1 is a string, expected an object",
        ),
        (
            {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]},
            "message 1: content is a number, expected a string",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "message 1: content is null, expected a string",
        ),
        ({"text": 3}, "'text' is a number, expected a string"),
        ({"text": ["a", "b"]}, "'text' is an array, expected a string"),
        ({"prompt": True, "completion": "c"}, "'prompt' is a boolean, expected a string"),
        ({"instruction": 1, "output": "o"}, "'instruction' is a number, expected a string"),
        ({"instruction": "i", "output": None}, "'output' is null, expected a string"),
        (
            {"system": 5, "question": "q", "answer": "a"},
            "'system' is a number, expected a string",
        ),
    ],
)
def test_field_of_the_wrong_type_is_rejected_naming_the_field_and_its_type(record, reason):
    assert rejected(record) == reason


@pytest.mark.parametrize("role", [["user"], {"name": "user"}, 1, None])
def test_role_that_is_not_a_string_is_rejected_as_unknown_role(role):
    # A list or object role used to escape as TypeError (unhashable) from the fast path,
    # which failed the whole file instead of rejecting this one record.
    record = {"messages": [{"role": role, "content": "Hi"}, {"role": "assistant", "content": "a"}]}
    assert rejected(record).startswith(f"message 1: unknown role {role!r}")


def test_content_part_that_is_not_an_object_is_rejected_naming_its_type():
    record = {
        "messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "a"}]
    }
    assert rejected(record) == "message 1: content part of type 'string' is not supported"


def test_every_rejection_is_a_value_error_for_callers_that_catch_broadly():
    with pytest.raises(ValueError):
        normalise({"messages": []}, LIMIT)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "Hi."}],
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": 'A, "quoted".'}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A.", "weight": 0},
            {"role": "user", "content": "ünïcode ☃?"},
            {"role": "assistant", "content": "B."},
        ],
        [
            {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."},
            {"role": "user", "content": "trailing"},
        ],
    ],
)
def test_the_prompt_hash_is_the_question_whatever_its_answer_system_prompt_or_spelling(
    messages,
):
    from evertune.store.formats import prompt_hash

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    expected = prompt_hash(messages)
    assert expected == prompt_hash([*messages[:last], {"role": "assistant", "content": "other"}])
    assert expected != prompt_hash([{"role": "user", "content": "x"}, *messages])
    framed = [{"role": "system", "content": "You are a helpful assistant."}]
    respelled = [
        {**m, "content": "  " + m["content"].upper().replace(" ", "\n ")} for m in messages
    ]
    no_system = [m for m in messages if m["role"] != "system"]
    assert prompt_hash([*framed, *no_system]) == expected == prompt_hash(respelled)
