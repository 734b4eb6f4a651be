"""``guildtune demo --model tiny`` end to end: the report holds the matrix and both charts, the
adapters personalize, and only the consenting members' data was stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guildtune.cli import main


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["--config", str(tmp_path / "none.toml"), "demo"]) == 1  # missing config file
    assert main(["demo", "--model", "tiny", "--rounds", "3", "--out", str(out)]) == 0
    report = (out / "report.md").read_text(encoding="utf-8")
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
