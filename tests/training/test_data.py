"""Reading training data: every unreadable file is one error naming the file, the line or byte offset, and the cause."""

from __future__ import annotations

import json

import pytest

from peftkit.training.data import DataError, Record, RecordError, load_records, require_string, split_records


def _write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def test_records_remember_their_file_and_number_through_a_split(tmp_path):
    path = _write(tmp_path, "d.jsonl", b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(10)))
    records = load_records(path)
    assert [r.number for r in records] == list(range(1, 11)) and records[3] == {"prompt": "p3"}
    train, held_out = split_records(records, 3, seed=0)
    assert all(r == {"prompt": f"p{r.number - 1}"} and r.source == path for r in train + held_out)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\n\n  \n", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n{"prompt": "c"}\n', r"line 2 is not valid JSON \(Expecting value at column 12\)"),
        ("binary.jsonl", b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n', r"is not UTF-8 text: byte 0xff at offset 28 \(line 2\)"),
        ("latin1.csv", b"prompt,response\ncaf\xe9,yes\n", r"is not UTF-8 text: byte 0xe9 at offset 19 \(line 2\)"),
        ("bad.json", b'[{"prompt": "a"},\n {"prompt": }]', r"line 2, column 13 is not valid JSON"),
        ("empty-list.json", b"[]", r"holds no records \(an empty JSON list\)"),
    ],
)
def test_an_unreadable_data_file_is_one_error_naming_the_line(tmp_path, name, content, expected):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=expected) as info:
        load_records(path)
    message = str(info.value)
    assert path in message and "StopIteration" not in message and "DatasetGenerationError" not in message


def test_mixed_types_are_named_when_they_stop_the_reader(tmp_path, monkeypatch):
    import datasets
    from datasets.exceptions import DatasetGenerationError

    def fail(*args, **kwargs):  # datasets 3.x/4.x (both allowed by pyproject) fail this way on mixed types; 5.x reads them
        raise DatasetGenerationError("An error occurred while generating the dataset")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    mixed = _write(tmp_path, "mixed.jsonl", b'{"prompt": "a", "response": "x"}\n{"prompt": "b", "response": null}\n{"prompt": "c", "response": ["y"]}\n')
    with pytest.raises(DataError, match=r"line 3: field 'response' is a list \(\['y'\]\) but a string on line 1; a field must have one type"):
        load_records(mixed)
    not_objects = _write(tmp_path, "lists.jsonl", b'{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not an object"):
        load_records(not_objects)
    fine = _write(tmp_path, "fine.jsonl", b'{"a": 1}\n')  # nothing found: the reader's own message, with the file
    with pytest.raises(DataError, match=r"fine.jsonl'?: DatasetGenerationError: An error occurred"):
        load_records(fine)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_record_errors_name_the_file_and_record_when_known():
    records = [Record({"a": 1}, "d.jsonl", 7), Record({"a": 2}, "d.jsonl", 3)]
    error = RecordError(1, "'a' is bad")
    assert str(error) == "record 1: 'a' is bad"
    assert str(error.located(records)) == "data 'd.jsonl', record 3: 'a' is bad"
    assert error.located([{"a": 1}, {"a": 2}]) is error  # plain dicts know no file


def test_require_string_names_what_it_got():
    assert require_string("x", "'a'", 0) == "x"
    with pytest.raises(RecordError, match=r"record 2: 'a' is an int \(5\), not a string"):
        require_string(5, "'a'", 2)
