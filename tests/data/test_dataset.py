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
