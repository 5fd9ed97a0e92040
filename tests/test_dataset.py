"""LLaVA records -> ids, labels, images; the collator; length-grouped batches.

- The loss falls on every answer of a multi-turn conversation, including </s>; the token ids equal the
  chat template's rendering and the inference prompt.
- Truncation drops whole turns and never cuts the placeholder; role-order errors.
- JSON and JSONL loading, with line-numbered errors.
- The dataset and collator: per-batch padding; missing images and marker/image count mismatches are found
  when the file is read, with their lines.
- Length-grouped batches visit every sample once per epoch, change order every epoch, cut padding (under
  10% waste against over 50% for plain batches on the same lengths), and give the same global batches with
  2 ranks, with 2 accumulation steps and with one process at twice the batch.
"""
import json
import re

import pytest
from PIL import Image

from model.LMConfig import IMAGE_MARKER, IMAGE_PLACEHOLDER
from model.tokenizer import build_prompt
from trainer.data import IGNORE_INDEX, VLMCollator, VLMDataset, tokenize_conversation
from trainer.data_index import open_dataset
from trainer.records import check_record, conversation_to_messages, read_records


def rec(*turns, image="a.png", id_="r0"):
    conv = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]
    return {"id": id_, "image": image, "conversations": conv}


def decode_labelled(tokenizer, ids, labels):
    """The text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


def test_multi_turn_loss_on_every_answer(tokenizer):
    r = rec("<image>\nWhat colour?", "red", "And the shape?", "a big circle")
    ids, labels = tokenize_conversation(tokenizer, conversation_to_messages(r), 640)
    assert decode_labelled(tokenizer, ids, labels) == ["red</s>", "a big circle</s>"]
    # the ids are exactly the chat template's rendering of the whole conversation (the template itself does
    # not know the image marker: it gets the placeholder text)
    msgs = [dict(m, content=m["content"].replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)) for m in conversation_to_messages(r)]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert ids == tokenizer(full, add_special_tokens=False).input_ids
    assert full.count(IMAGE_PLACEHOLDER) == 1
    # and inference builds the same prompt prefix
    prompt = build_prompt([{"role": "user", "content": "<image>\nWhat colour?"}])
    assert full.startswith(prompt)


def test_truncation_drops_whole_turns_and_keeps_placeholder(tokenizer, image_ids):
    r = rec("<image>\nWhat colour?", "red", "And the shape? " * 10, "circle " * 20)
    msgs = conversation_to_messages(r)
    full, _ = tokenize_conversation(tokenizer, msgs, 640)
    first_turn, _ = tokenize_conversation(tokenizer, msgs[:2], 640)
    ids, labels = tokenize_conversation(tokenizer, msgs, len(full) - 1)
    assert ids == first_turn  # the second turn did not fit: it is dropped whole
    assert decode_labelled(tokenizer, ids, labels) == ["red</s>"]
    s = ",".join(map(str, ids))
    assert ",".join(map(str, image_ids)) in s
    # a first answer that does not fit is cut, the placeholder never
    long = rec("<image>\nDescribe.", "word " * 200)
    ids, labels = tokenize_conversation(tokenizer, conversation_to_messages(long), 100)
    assert len(ids) == 100 and ",".join(map(str, image_ids)) in ",".join(map(str, ids))
    with pytest.raises(ValueError, match=r"r0.*first prompt is \d+ tokens .*max_seq_len is 40"):
        tokenize_conversation(tokenizer, conversation_to_messages(long), 40, where="r0")


def test_bad_role_order(tokenizer):
    bad = {"conversations": [{"from": "gpt", "value": "hi"}]}
    with pytest.raises(ValueError, match="assistant turn without a user turn"):
        tokenize_conversation(tokenizer, conversation_to_messages(bad), 64)


def test_read_records_json_and_jsonl(tmp_path):
    def problems(path):
        entries, found = read_records(path)
        return entries, found + [p for e in entries for p in check_record(e, str(path))]
    r = rec("<image>\nq", "a")
    (tmp_path / "a.json").write_text(json.dumps([r, r]))
    (tmp_path / "b.jsonl").write_text(json.dumps(r) + "\n\n" + json.dumps(r) + "\n")
    for name in ("a.json", "b.jsonl"):
        entries, found = problems(tmp_path / name)
        assert len(entries) == 2 and found == []
    (tmp_path / "c.jsonl").write_text(json.dumps(r) + "\n{broken\n")
    _, found = problems(tmp_path / "c.jsonl")
    assert len(found) == 1 and re.search(r"c.jsonl:2: invalid JSON", found[0].message())
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "x9", "image": "a.png"}) + "\n")
    _, found = problems(tmp_path / "d.jsonl")
    assert len(found) == 1 and re.search(r"d.jsonl:1 \(id x9\): needs a non-empty 'conversations'", found[0].message())


def test_dataset_and_collator(tmp_path, tokenizer, image_ids):
    Image.new("RGB", (300, 200), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("L", (64, 64), 90).save(tmp_path / "b.png")
    rows = [rec("<image>\nWhat colour?", "red", id_="r0"),
            rec("<image>\nWhat colour is this shape, please tell me?", "grey", "Sure?", "yes", image="b.png", id_="r1"),
            rec("<image>\nq", "a", image="missing.png", id_="r2"),
            rec("no marker", "a", id_="r3")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = open_dataset(str(tmp_path / "d.jsonl"), str(tmp_path), tokenizer, 640)
    s0, s1 = ds[0], ds[1]
    assert s0["pixel_values"][0].shape == (3, 224, 224) and s1["pixel_values"][0].shape == (3, 224, 224)
    batch = VLMCollator(pad_id=0)([s0, s1])
    T = max(len(s0["input_ids"]), len(s1["input_ids"]))
    assert batch["input_ids"].shape == (2, T)  # padded to the longest in the batch, not max_seq_len
    assert batch["labels"][0, len(s0["input_ids"]):].eq(IGNORE_INDEX).all()
    assert batch["image_counts"] == [1, 1] and batch["pixel_values"].shape == (2, 3, 224, 224)
    # the bad records are found when the file is read, not when a batch meets them
    assert len(ds) == 2 and [(p.kind, p.line, p.id) for p in ds.problems] == [("image_missing", 3, "r2"),
                                                                              ("marker_missing", 4, "r3")]
    assert "missing.png does not exist" in ds.problems[0].detail


def test_length_grouped_batches_visit_every_sample_once():
    from trainer.data import LengthGroupedBatchSampler
    lengths = [(i * 37) % 300 + 20 for i in range(1003)]
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=16)
    for epoch in (0, 1):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 126
        assert sorted(i for b in batches for i in b) == list(range(1003))
        assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8  # the short one last
    assert list(s) != (s.set_epoch(0) or list(s))  # a new order every epoch
    # grouping cuts padding: the tokens a batch pads to (its longest) over the tokens it holds
    def waste(sampler):
        return sum(len(b) * max(lengths[i] for i in b) for b in sampler) / sum(lengths)
    plain = LengthGroupedBatchSampler(lengths, batch_size=8, seed=3, group=1)
    assert waste(s) < 1.1 < 1.5 < waste(plain)


def test_length_grouped_batches_split_global_batches_across_ranks_and_accumulation():
    from trainer.data import LengthGroupedBatchSampler
    lengths = [(i * 13) % 97 for i in range(100)]
    one = list(LengthGroupedBatchSampler(lengths, batch_size=8, seed=1))
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    accum = list(LengthGroupedBatchSampler(lengths, 4, seed=1, accumulation=2))
    assert len(one) == 13 and len(ranks[0]) == len(ranks[1]) == 13 and len(accum) == 25
    for step, batch in enumerate(one):  # each global batch: the same samples in every layout
        assert sorted(batch) == sorted(ranks[0][step] + ranks[1][step])
        assert sorted(batch) == sorted(sum(accum[2 * step:2 * step + 2], []))
    # 101 samples on 2 ranks: padded with one repeat so both ranks run the same number of steps
    ranks = [list(LengthGroupedBatchSampler(lengths + [5], 4, num_replicas=2, rank=r, seed=1)) for r in (0, 1)]
    assert sum(map(len, ranks[0])) == sum(map(len, ranks[1])) == 51


def test_record_index_is_kept_and_rebuilt_when_file_or_tokenizer_change(tmp_path, tokenizer):
    """The index (positions, ids, image names, token lengths, problems) is saved once per (file contents,
    tokenizer, max_seq_len) and read back equal; a changed file, tokenizer or max_seq_len gets a new one."""
    import copy
    import numpy as np
    from trainer.data_index import load_index
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "a.png")
    rows = [rec("<image>\nWhat colour?", "red " * (i + 1), id_=f"r{i}") for i in range(30)]
    rows += [rec("no marker", "a", id_="bad"), rec("<image>\n" + "long " * 300, "x", id_="long")]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows, indent=1))
    idx_dir = tmp_path / "index"
    built, how = load_index(data, tokenizer, 200, idx_dir)
    assert how.startswith("built") and len(list(idx_dir.iterdir())) == 1
    read, how = load_index(data, tokenizer, 200, idx_dir)
    assert how == "read" and len(read) == len(built) == 30 and read.n_records == 32
    for k in ("offset", "size", "line", "length", "name_end"):
        assert np.array_equal(getattr(read, k), getattr(built, k)), k
    assert [p.kind for p in read.problems] == [p.kind for p in built.problems] == ["marker_missing", "too_long"]
    assert read.record(29) == rows[29] and read.id(3) == "r3" and read.names[0] == "a.png"
    # the lengths are what training makes of each record
    ds = VLMDataset(read, str(tmp_path), tokenizer, 200)
    assert [len(ds[i]["input_ids"]) for i in range(30)] == ds.lengths.tolist()
    # each change is a new index, never the stale one
    assert load_index(data, tokenizer, 300, idx_dir)[1].startswith("built")
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<zz>"])
    assert load_index(data, other, 200, idx_dir)[1].startswith("built")
    rows[0] = rec("<image>\nWhat colour now?", "blue", id_="r0")
    data.write_text(json.dumps(rows, indent=1))
    changed, how = load_index(data, tokenizer, 200, idx_dir)
    assert how.startswith("built") and changed.record(0) == rows[0] and len(list(idx_dir.iterdir())) == 4
    assert load_index(data, tokenizer, 200, idx_dir)[1] == "read"
