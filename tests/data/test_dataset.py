import json

import pytest

from radscribe.data.dataset import read_split, to_chat
from radscribe.errors import RadscribeError


def _rows(n):
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": "<image>what?"},
                                         {"role": "assistant", "content": f"报告 {i} " + "x" * (i * 997 % 3000)}],
             "images": [f"images/r{i}.png"], "truth": {"organ": "lung"}} for i in range(n)]


def test_streams_a_json_array_larger_than_one_read(tmp_path):
    rows = _rows(800)  # ~1.2 MB: crosses the 1 MiB read boundary
    (tmp_path / "train.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    got = list(read_split(tmp_path, "train"))
    assert [s.id for s in got] == [r["id"] for r in rows]
    assert got[5].report == rows[5]["messages"][1]["content"]
    assert got[0].images[0] == tmp_path / "images/r0.png" and got[0].truth == {"organ": "lung"}


def test_jsonl_and_llamafactory_tags(tmp_path):
    row = {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}],
           "images": ["a.png"]}
    (tmp_path / "val.jsonl").write_text(json.dumps(row) + "\n")
    (s,) = read_split(tmp_path, "val")
    assert s.prompt == "<image>q" and s.report == "a" and s.messages[0]["role"] == "user"


def test_placeholder_mismatch_names_the_row(tmp_path):
    rows = _rows(2)
    rows[1]["images"] = []
    (tmp_path / "train.json").write_text(json.dumps(rows))
    with pytest.raises(RadscribeError, match="row 1 has 1 <image> placeholders but 0 images"):
        list(read_split(tmp_path, "train"))


def test_to_chat_places_images():
    chat = to_chat([{"role": "user", "content": "<image>describe"}, {"role": "assistant", "content": "ok"}], ["IMG"])
    assert chat[0]["content"] == [{"type": "image", "image": "IMG"}, {"type": "text", "text": "describe"}]
    assert chat[1]["content"] == [{"type": "text", "text": "ok"}]


def test_split_rows_reads_any_row_back_by_offset_in_any_layout(tmp_path):
    import multiprocessing
    import pickle

    from radscribe.data.dataset import SplitRows

    rows = _rows(800)  # multi-byte reports across the 1 MiB read boundaries
    layouts = {"pretty": json.dumps(rows, ensure_ascii=False, indent=2),
               "lines": "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n",
               "escaped": json.dumps(rows)}  # \uXXXX escapes instead of UTF-8
    for name, text in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "train.json").write_text(text, encoding="utf-8")
        split = SplitRows(folder, "train")
        assert len(split) == 800
        assert [split[i].report for i in (799, 0, 411)] == [rows[i]["messages"][1]["content"] for i in (799, 0, 411)]
        assert [s.id for s in read_split(folder, "train")] == [r["id"] for r in rows]
        assert len(SplitRows(folder, "train", limit=5)) == 5
    # a copy in a forked worker (or a pickled one) reads on its own file handle
    again = pickle.loads(pickle.dumps(split))
    assert again[123].id == "r123"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_report_of, (split, 321)) == rows[321]["messages"][1]["content"]
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:9]))
    assert SplitRows(tmp_path / "jsonl", "train")[8].id == "r8"


def _report_of(split, index):
    return split[index].report


def test_split_rows_name_the_row_of_broken_json(tmp_path):
    from radscribe.data.dataset import SplitRows

    text = "[\n" + ",\n".join(json.dumps(r) for r in _rows(3)) + "\n]\n"
    (tmp_path / "train.json").write_text(text[:-40] + "\n]\n")  # row 2 cut short
    with pytest.raises(RadscribeError, match=r"train.json: row 2: truncated or invalid JSON"):
        SplitRows(tmp_path, "train")
    (tmp_path / "train.json").write_text("[" + json.dumps(_rows(1)[0]) + ", 7]")
    with pytest.raises(RadscribeError, match="row 1 is not a JSON object"):
        SplitRows(tmp_path, "train")
