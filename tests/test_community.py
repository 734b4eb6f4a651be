"""Community files: JSONL and DiscordChatExporter JSON, and broken files with one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guildtune.community import (
    CommunityFileError,
    read_community,
    read_discord_export,
    read_jsonl,
    reply_pairs,
)

IRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "irc"


def _jsonl(tmp_path: Path, lines: list) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_jsonl_reply_links_survive_and_parts_do_not_collide(tmp_path: Path) -> None:
    rows = [{"community": "c", "part": part, "seq": seq, "time": "12:00", "author_id": a,
             "text": f"p{part}s{seq}", "reply_to": r}
            for part, seq, a, r in ((0, 0, 1, []), (0, 1, 2, [0]), (1, 0, 3, []),
                                    (1, 1, 1, [0]), (1, 2, 1, [1]))]
    msgs = read_jsonl(_jsonl(tmp_path, rows))
    pairs = [(p.text, r.text) for p, r in reply_pairs(msgs)]
    assert pairs == [("p0s0", "p0s1"), ("p1s0", "p1s1")]  # the self-reply is not a pair
    assert len({m.message_id for m in msgs}) == 5


@pytest.mark.parametrize("line, expected", [
    ("not json", "c.jsonl:2: not valid JSON"),
    ("[1, 2]", "c.jsonl:2: expected a JSON object"),
    ({"part": 0, "seq": 1, "author_id": 1, "text": "x"}, "c.jsonl:2: missing field 'reply_to'"),
    ({"part": 0, "seq": "1", "author_id": 1, "text": "x", "reply_to": []},
     "c.jsonl:2: field 'seq' has the wrong type (str)"),
    ({"part": 0, "seq": 1, "author_id": "bob", "text": "x", "reply_to": []},
     "c.jsonl:2: author_id and reply_to must be integers"),
])
def test_broken_jsonl_names_line_and_field(tmp_path: Path, line: object, expected: str) -> None:
    good = {"part": 0, "seq": 0, "author_id": 1, "text": "ok", "reply_to": []}
    with pytest.raises(CommunityFileError) as exc:
        read_jsonl(_jsonl(tmp_path, [good, line]))
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_empty_and_binary_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(CommunityFileError, match="no messages"):
        read_jsonl(empty)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CommunityFileError, match="not UTF-8"):
        read_jsonl(binary)


def _export(messages: list) -> dict:
    return {"guild": {"id": "1", "name": "g"}, "channel": {"id": "2", "name": "general"},
            "messages": messages}


def test_discord_chat_exporter_json(tmp_path: Path) -> None:
    p = tmp_path / "export.json"
    p.write_text(json.dumps(_export([
        {"id": "1001", "type": "Default", "timestamp": "2024-01-01T00:00:00+00:00",
         "content": "how do I deploy?", "author": {"id": "11", "name": "ann", "isBot": False}},
        {"id": "1002", "type": "Reply", "timestamp": "2024-01-01T00:01:00+00:00",
         "content": "push to main", "author": {"id": "22", "name": "bo", "isBot": False},
         "reference": {"messageId": "1001", "channelId": "2"}},
        {"id": "1003", "type": "Default", "content": "beep", "timestamp": "",
         "author": {"id": "33", "name": "bot", "isBot": True}},
        {"id": "1004", "type": "ChannelPinnedMessage", "content": "pinned", "timestamp": "",
         "author": {"id": "11", "name": "ann"}},
    ])))
    msgs = read_community(p)
    assert [m.text for m in msgs] == ["how do I deploy?", "push to main"]
    assert [(a.text, b.text) for a, b in reply_pairs(msgs)] == [("how do I deploy?",
                                                                 "push to main")]
    assert msgs[1].user_id == 22 and msgs[1].reply_to == (1001,)


@pytest.mark.parametrize("doc, expected", [
    ("{not json", "not a JSON document"),
    (json.dumps({"foo": []}), "no 'messages' list"),
    (json.dumps(_export([{"id": "x", "author": {"id": "1"}, "content": "a"}])),
     "messages[0]: missing or bad 'id' or 'author.id'"),
    (json.dumps(_export([{"id": "5", "author": {"id": "1"}, "content": 3}])),
     "messages[0]: 'content' must be a string"),
])
def test_broken_exports_name_the_field(tmp_path: Path, doc: str, expected: str) -> None:
    p = tmp_path / "export.json"
    p.write_text(doc)
    with pytest.raises(CommunityFileError) as exc:
        read_discord_export(p)
    assert expected in str(exc.value)


@pytest.mark.skipif(not IRC.is_dir(), reason="shared data not present")
def test_the_six_real_communities_parse() -> None:
    counts = {p.stem: len(list(reply_pairs(read_jsonl(p)))) for p in IRC.glob("*.jsonl")}
    assert len(counts) == 6 and all(n >= 250 for n in counts.values()), counts
