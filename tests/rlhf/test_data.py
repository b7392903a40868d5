import json

import pytest

from rlhf.data import (IGNORE_INDEX, DataError, collate_rankings, collate_sft, load_rows, pack_examples,
                       ranking_shape, sft_shape, tokenize_rankings, tokenize_sft)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv", "parquet"])
def test_load_rows_local_formats(tmp_path, ext):
    import datasets

    rows = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "2+2=", "completion": "4"}]
    path = tmp_path / f"d.{ext}"
    ds = datasets.Dataset.from_list(rows)
    {"jsonl": lambda: ds.to_json(path), "json": lambda: ds.to_json(path), "csv": lambda: ds.to_csv(path, index=False),
     "parquet": lambda: ds.to_parquet(path)}[ext]()
    loaded = load_rows(str(path), required=["prompt", "completion"])
    assert loaded.to_list() == rows


def test_missing_column_names_column_and_file(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "answer": "3"}])
    with pytest.raises(DataError, match=r"d\.jsonl: missing column `completion`"):
        load_rows(path, required=["prompt", "completion"])
    with pytest.raises(DataError, match=r"d\.jsonl: missing column `completion`"):
        tokenize_sft(load_rows(path), None, 64, source=path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+2=", "completion": "3"}\n{"prompt": "2+2=", "completion": \n')
    with pytest.raises(DataError, match=r"d\.jsonl: line 2"):
        load_rows(str(path))


def test_sft_formats_and_completion_only_masking(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    pc = load_rows(_jsonl(tmp_path / "pc.jsonl", [{"prompt": "12+3=", "completion": "15"}]))
    ex = tokenize_sft(pc, tok, 64).examples[0]
    completion = tok("15", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == tok("12+3=")["input_ids"] + completion + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * 6 + ex["input_ids"][6:]  # BOS + 5 prompt chars masked
    full = tokenize_sft(pc, tok, 64, completion_only_loss=False).examples[0]
    assert full["labels"] == full["input_ids"]

    text = load_rows(_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]))
    ex = tokenize_sft(text, tok, 64).examples[0]
    assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]  # only BOS is unsupervised

    msgs = load_rows(_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "1+2="},
                                                                   {"role": "assistant", "content": "3"}]}]))
    ex = tokenize_sft(msgs, tok, 64).examples[0]
    supervised = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "3</s>"
    assert tok.decode(ex["input_ids"]) == "<s><|user|>1+2=\n<|assistant|>3</s>"

    batch = collate_sft([tokenize_sft(pc, tok, 64).examples[0], ex], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0][batch["attention_mask"][0] == 0] == tok.pad_token_id).all()


def test_empty_fields_and_length_policy(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    bad = load_rows(_jsonl(tmp_path / "e.jsonl", [{"prompt": "1+2=", "completion": "3"},
                                                  {"prompt": "1+2=", "completion": " "}]))
    with pytest.raises(DataError, match=r"e\.jsonl: line 2: empty or non-string `completion`"):
        tokenize_sft(bad, tiny_tokenizer, 64, source=str(tmp_path / "e.jsonl"))
    rows = load_rows(_jsonl(tmp_path / "l.jsonl", [{"prompt": "1+2=", "completion": "3"},
                                                   {"prompt": "1" * 80 + "+2=", "completion": "3"}]))
    out = tokenize_sft(rows, tiny_tokenizer, 32, source="l.jsonl")
    assert len(out.examples) == 1 and out.dropped_too_long == 1
    assert capsys.readouterr().err == ("l.jsonl: dropped 1 of 2 examples longer than max_length=32 tokens "
                                       "(--max_length keeps them)\n")
    monkeypatch.setenv("RANK", "1")  # another process of a launch: the first one says it
    tokenize_sft(rows, tiny_tokenizer, 32, source="l.jsonl")
    assert capsys.readouterr().err == ""


def test_packing_keeps_labels_aligned():
    exs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    packed = pack_examples(exs, 2)
    assert packed == [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3, 4], "labels": [3, -100]}]


def test_rankings_pairwise_and_kwise(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    pw = load_rows(_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": "4"}]))
    kw = load_rows(_jsonl(tmp_path / "k.jsonl", [
        {"prompt": "1+2=", "completions": ["4", "3"], "ranks": [1, 0]},
        {"prompt": "5+5=", "completions": ["10", "0", "?"], "ranks": [0, 1, 1]}]))
    g = tokenize_rankings(pw, tok, 64).examples[0]
    assert g["ranks"] == [0, 1] and len(g["input_ids"]) == 2
    batch = collate_rankings(tokenize_rankings(kw, tok, 64).examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["ranks"].tolist() == [[1, 0, -1], [0, 1, 1]]


def test_scoring_batches_put_like_shapes_together_and_deal_them_to_processes():
    """An evaluation pass's batches: every example once, in order of padded shape (less padding than the file's
    order), the same batches whatever the number of processes, dealt in turn."""
    from types import SimpleNamespace

    from rlhf.training import scoring_batches

    shapes = [(2, 12), (3, 10), (2, 5), (2, 16), (2, 6), (3, 4), (2, 11), (2, 3)]  # (K, longest sequence)
    groups = [{"input_ids": [[7] * (n - j) for j in range(k)], "prompt_len": 2, "ranks": list(range(k))}
              for k, n in shapes]
    sfts = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 1, 9, 3)]
    assert [ranking_shape(g) for g in groups] == shapes and [sft_shape(e) for e in sfts] == [(5,), (1,), (9,), (3,)]

    def batches(examples, bs, shape, rank=0, world=1):
        return scoring_batches(SimpleNamespace(process_index=rank, num_processes=world), examples, bs, shape)

    one = batches(groups, 2, ranking_shape)
    assert one == [[7, 2], [4, 6], [0, 3], [5, 1]]  # sorted by (K, longest), then cut in twos
    assert [batches(groups, 2, ranking_shape, r, 2) for r in (0, 1)] == [one[0::2], one[1::2]]
    assert batches(sfts, 3, sft_shape) == [[1, 3, 0], [2]]

    def positions(chunks):  # what collate_rankings pads: rows x longest sequence
        return sum(collate_rankings([groups[i] for i in c], 0)["input_ids"].numel() for c in chunks)
    assert positions(one) == 188 < positions([[0, 1], [2, 3], [4, 5], [6, 7]]) == 216


@pytest.mark.parametrize("ranks", [[0], [0, "x"], "01", [0, -1], [0, 1.5]])
def test_bad_ranks_name_the_line(tmp_path, tiny_tokenizer, ranks):
    path = _jsonl(tmp_path / "r.jsonl", [{"prompt": "1+2=", "completions": ["3", "4"], "ranks": [0, 1]},
                                         {"prompt": "1+2=", "completions": ["3", "4"], "ranks": ranks}])
    with pytest.raises(DataError, match=r"r\.jsonl: line 2"):
        tokenize_rankings(load_rows(path), tiny_tokenizer, 64, source=path)


def test_empty_prompt_or_completion_in_rankings(tmp_path, tiny_tokenizer):
    path = _jsonl(tmp_path / "r.jsonl", [{"prompt": "", "chosen": "3", "rejected": "4"}])
    with pytest.raises(DataError, match=r"line 1: empty or non-string `prompt`"):
        tokenize_rankings(load_rows(path), tiny_tokenizer, 64, source=path)
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": "1+2=", "chosen": "3", "rejected": ""}])
    with pytest.raises(DataError, match=r"line 1: empty or non-string completion"):
        tokenize_rankings(load_rows(path), tiny_tokenizer, 64, source=path)


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("row", [
    {"prompt": [_user("1+2=")], "chosen": [_assistant("3")], "rejected": [_assistant("4")]},
    {"prompt": [_user("1+2=")], "chosen": "3", "rejected": "4"},  # string answers to a chat prompt
    {"chosen": [_user("1+2="), _assistant("3")], "rejected": [_user("1+2="), _assistant("4")]},  # implicit prompt
    {"prompt": "1+2=", "chosen": [_user("1+2="), _assistant("3")], "rejected": [_user("1+2="), _assistant("4")]},
], ids=["messages", "string answers", "implicit prompt", "string prompt, whole conversations"])
def test_chat_preference_rows_are_their_rendered_chat(tmp_path, tiny_tokenizer, row):
    """Every conversational layout tokenises as the chat template renders it: the same examples as the rendered
    prompt and answers given as plain text (whose BOS and EOS the tokenizer adds)."""
    tok = tiny_tokenizer
    g = tokenize_rankings(load_rows(_jsonl(tmp_path / "c.jsonl", [row])), tok, 64).examples[0]
    assert [tok.decode(ids) for ids in g["input_ids"]] == ["<s><|user|>1+2=\n<|assistant|>3</s>",
                                                           "<s><|user|>1+2=\n<|assistant|>4</s>"]
    assert tok.decode(g["input_ids"][0][:g["prompt_len"]]) == "<s><|user|>1+2=\n<|assistant|>"
    plain = {"prompt": "<|user|>1+2=\n<|assistant|>", "chosen": "3", "rejected": "4"}
    assert g == tokenize_rankings(load_rows(_jsonl(tmp_path / "p.jsonl", [plain])), tok, 64).examples[0]


def test_chat_rankings_and_multi_turn_prompts(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [_user("1+2="), _assistant("3"), _user("and 2+2=")]
    rows = [{"prompt": turns, "completions": [[_assistant("4")], [_assistant("5")], [_assistant("22")]],
             "ranks": [0, 2, 1]},
            {"completions": [turns + [_assistant("4")], turns + [_assistant("5")]], "ranks": [0, 1]}]
    groups = tokenize_rankings(load_rows(_jsonl(tmp_path / "k.jsonl", rows)), tok, 64).examples
    head = "<s><|user|>1+2=\n<|assistant|>3</s><|user|>and 2+2=\n<|assistant|>"
    assert [tok.decode(ids) for ids in groups[0]["input_ids"]] == [head + "4</s>", head + "5</s>", head + "22</s>"]
    assert groups[0]["ranks"] == [0, 2, 1] and tok.decode(groups[1]["input_ids"][0][:groups[1]["prompt_len"]]) == head
    assert groups[1]["input_ids"] == groups[0]["input_ids"][:2]


@pytest.mark.parametrize("row, needle", [
    ({"chosen": [_user("1+2="), _assistant("3")], "rejected": [_user("1+3="), _assistant("4")]},
     "no first message in common"),
    ({"chosen": [_user("1+2="), _assistant("3")], "rejected": [_user("1+2="), _assistant("3")]},
     "the same conversation twice"),
    ({"prompt": [_user("1+2=")], "chosen": [_assistant("3")], "rejected": [_assistant("3")]}, "the same response"),
    ({"prompt": [_user("1+2=")], "chosen": [_user("x"), _assistant("3")], "rejected": [_assistant("4")]},
     "from the assistant's turn on"),
    ({"prompt": [_user("1+2=")], "chosen": [_assistant(" ")], "rejected": [_assistant("4")]},
     "must be non-empty chat messages"),
    ({"chosen": "3", "rejected": "4"}, "missing `prompt`"),
])
def test_bad_chat_preference_rows_name_the_line(tmp_path, tiny_tokenizer, row, needle):
    good = ({"prompt": "5+5=", "chosen": "10", "rejected": "0"} if isinstance(row["chosen"], str) else  # a column
            {"prompt": [_user("5+5=")], "chosen": [_assistant("10")], "rejected": [_assistant("0")]})  # keeps a type
    path = _jsonl(tmp_path / "r.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"r\.jsonl: line 2: .*{needle}"):
        tokenize_rankings(load_rows(path), tiny_tokenizer, 64, source=path)


def test_rankings_that_all_tie_are_dropped_and_counted(tmp_path, tiny_tokenizer, capsys):
    path = _jsonl(tmp_path / "t.jsonl", [{"prompt": "1+2=", "completions": ["3", "4", "5"], "ranks": [0, 1, 1]},
                                         {"prompt": "1+3=", "completions": ["4", "5"], "ranks": [2, 2]},
                                         {"prompt": "1+4=", "completions": ["5" * 70, "6"], "ranks": [0, 1]}])
    out = tokenize_rankings(load_rows(path), tiny_tokenizer, 64, source=path)
    assert len(out.examples) == 1 and out.examples[0]["ranks"] == [0, 1, 1] and out.dropped_all_ties == 1
    assert out.dropped_too_long == 1
    assert capsys.readouterr().err == (f"{path}: dropped 2 of 3 rankings: 1 longer than max_length=64 tokens "
                                       "(--max_length keeps them), 1 whose responses all tie\n")


@pytest.mark.parametrize("rows, needle", [
    ([{"ranks": [0, 1]}, {"ranks": [1, 0]}, {"ranks": [0, "x"]}],
     "line 3: column `ranks` is a list of number and string"),
    ([{"answer": 1}, {"answer": 2.5}, {"answer": "3"}], "line 3: column `answer` is a string here but a number"),
    ([{"answer": None}, {"answer": "2"}, {"answer": ["3"]}], "line 3: column `answer` is a list of string here"),
])
def test_a_column_changing_type_is_blamed_on_its_line(tmp_path, rows, needle):
    path = _jsonl(tmp_path / "m.jsonl", [{"prompt": f"{i}+1=", **r} for i, r in enumerate(rows)])
    with pytest.raises(DataError, match=needle):
        load_rows(path)


def test_token_ids_are_the_tokenizers_own():
    """The fast path (the Rust backend called directly) gives what `tokenizer(text)` gives, special tokens and all;
    a backend padding to a fixed length falls back to the wrapper, which switches that padding off per call."""
    from rlhf.data.formats import token_ids
    from rlhf.models import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    texts = ["12+30=", "", " 7 4", "x<s>y", "999999+1="]
    for special in (True, False):
        assert token_ids(tok, texts, special) == [tok(t, add_special_tokens=special)["input_ids"] for t in texts]
    tok.backend_tokenizer.enable_padding(length=16, pad_id=tok.pad_token_id)
    assert token_ids(tok, texts, True) == [tok(t)["input_ids"] for t in texts]
    assert len(token_ids(tok, texts, True)[0]) < 16
