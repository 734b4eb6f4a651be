"""``guildtune demo --model tiny`` end to end: the report holds the matrix and both charts, the
adapters personalize, and only the consenting members' data was stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guildtune.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_tiny_model(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["--config", str(tmp_path / "none.toml"), "demo"]) == 1  # missing config file
    capsys.readouterr()
    assert main(["demo", "--model", "tiny", "--rounds", "3", "--out", str(out)]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    printed = capsys.readouterr().out
    # The report is printed as written: image links whole, table rows unbroken, no "/None".
    assert "![like-rate](like_rate.png)" in printed and "/None" not in printed
    assert all(line in printed.splitlines() for line in report.splitlines() if line.startswith("|"))
    assert "## Held-out loss matrix" in report and "| base |" in report
    assert (out / "loss_matrix.png").stat().st_size > 1000
    assert (out / "like_rate.png").stat().st_size > 1000
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [r["status"] for r in data["runs"]] == ["succeeded", "succeeded"]
    matrix = data["matrix"]
    for guild in ("harbor", "lab"):
        own = next(v for k, v in matrix.items() if k.startswith(f"{guild} v"))
        assert own[guild] < matrix["base"][guild]  # its adapter beats the base on its data
        others = [v[guild] for k, v in matrix.items() if k != "base" and not
                  k.startswith(f"{guild} v")]
        assert all(own[guild] < o for o in others)  # and beats the other guild's adapter
    for m in data["privacy"]["members"]:
        if not m["opted_in"]:
            assert m["interactions_stored"] == 0 and m["ratings_stored"] == 0
        else:
            assert m["interactions_stored"] > 0
    assert data["privacy"]["non_consented_ids_in_contexts"] == 0
    assert data["privacy"]["placeholders"] > 0  # their messages were seen, stored as placeholders


def test_demo_guilds_from_community_files(tmp_path: Path) -> None:
    """--data: one guild per file (community JSONL or DiscordChatExporter JSON); each guild's
    members like the words that set its community apart."""
    from guildtune.demo import build_guilds

    jsonl = tmp_path / "irc-cargo.jsonl"
    rows = []
    for i in range(20):
        rows.append({"part": 0, "seq": 2 * i, "author_id": 1, "text": f"how do I build crate {i}?",
                     "reply_to": []})
        rows.append({"part": 0, "seq": 2 * i + 1, "author_id": 2, "reply_to": [2 * i],
                     "text": "use cargo build with the release profile, cargo handles it"})
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    export = tmp_path / "bakers.json"
    msgs = []
    for i in range(20):
        msgs.append({"id": str(1000 + 2 * i), "type": "Default", "timestamp": "",
                     "content": f"what flour for loaf {i}?", "author": {"id": "7", "name": "a"}})
        msgs.append({"id": str(1001 + 2 * i), "type": "Reply", "timestamp": "",
                     "content": "sourdough starter and rye flour, knead gently",
                     "author": {"id": "8", "name": "b"},
                     "reference": {"messageId": str(1000 + 2 * i)}})
    export.write_text(json.dumps({"channel": {"name": "bread"}, "messages": msgs}))
    cargo, bakers = build_guilds([jsonl, export])
    assert (cargo.name, bakers.name) == ("cargo", "bakers")
    assert cargo.guild_id != bakers.guild_id and len(cargo.history) == 40
    assert "cargo" in cargo.community.liked_words and "cargo" not in bakers.community.liked_words
    assert bakers.community.likes("try a sourdough starter")
    assert cargo.prompts and all("crate" in p for p in cargo.prompts)
