"""The one prompt reader: every data format it knows, and one-line errors for the rest."""

from __future__ import annotations

import pytest

from cecollm.errors import UserError
from cecollm.prompting import SUMMARY_REQUEST, read_prompt_file, read_prompts, record_prompt


def test_prompts_from_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"instruction": "b", "input": "c"}\n{"instruction": " d ", "input": ""}\n'
                    '{"document": " doc "}\n{"question": "q?"}\n{"text": "t"}\n')
    assert read_prompts(None, str(path)) == ["a", "b\n\nc", "d", SUMMARY_REQUEST + "doc", "q?", "t"]
    assert read_prompts("x", str(path)) == ["x"]
    path.write_text('{"prompt": "a"}\n{"other": "a"}\n')
    with pytest.raises(UserError, match="record 2 has no prompt"):
        read_prompts(None, str(path))
    path.write_text("not json\n")
    with pytest.raises(UserError, match=":1: not JSON"):
        read_prompts(None, str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(UserError, match=":1: a record is a JSON object"):
        read_prompts(None, str(path))
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match="UTF-8"):
        read_prompts(None, str(path))
    with pytest.raises(UserError, match="file not found"):
        read_prompts(None, str(tmp_path / "missing.jsonl"))


def test_text_files_give_one_prompt_a_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n\n  \nsecond\n")
    assert read_prompt_file(path) == ["first", "second"]


def test_record_prompt_prefers_prompt_then_instruction():
    assert record_prompt({"prompt": "p", "instruction": "i"}) == "p"
    assert record_prompt({"instruction": "i", "input": "  x "}) == "i\n\nx"
    assert record_prompt({"answer": "no prompt"}) is None
