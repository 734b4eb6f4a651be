"""One home for each cross-process rule: "may this guild train, and why not" is
``guildtune.policy.training_block`` wherever it is decided or said (the bot, the scheduler, the
worker, the pipeline, the CLI), and the member-facing data statement is
``guildtune.data_statement`` in both its lengths (/consent and the README)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bot.cog import GuildTuneCog
from bot.handlers import Core, UserError
from guildtune.cli import main
from guildtune.config import parse_config
from guildtune.data_statement import (
    END,
    POINTS,
    README,
    START,
    _defaults,
    _values,
    consent_statement,
    readme_section,
    readme_text,
)
from guildtune.policy import DISCORD_POLICY, OPERATOR_OFF, explain, sentence, training_block
from storage import Store
from tests.fakes import make_services, write_config
from trainer import OPERATOR_DISABLED
from trainer.pipeline import TrainingError, check_allowed
from trainer.worker import execute_run

ROOT = Path(__file__).resolve().parents[1]
G = 42


# -- the data statement ----------------------------------------------------------------------


def test_the_readme_data_statement_is_the_generated_one() -> None:
    readme = README.read_text(encoding="utf-8")
    assert readme.count(START) == 1 and readme.count(END) == 1
    documented = readme[readme.index(START):readme.index(END) + len(END)]
    assert documented == readme_section(_defaults()), (
        "README's data statement drifted from guildtune/data_statement.py: run "
        "`python -m guildtune.data_statement --write-readme`")
    heading = readme.rindex("\n## ", 0, readme.index(START))
    assert readme[heading:].startswith("\n## Data statement (for your members)\n")


def test_regenerating_puts_a_drifted_section_back() -> None:
    readme = README.read_text(encoding="utf-8")
    drifted = readme.replace("ids never reach a training example", "ids are kept", 1)
    assert drifted != readme
    assert readme_text(drifted, _defaults()) == readme
    with pytest.raises(ValueError, match="data-statement"):
        readme_text("# no markers", _defaults())


def test_both_lengths_come_from_the_same_points() -> None:
    cfg = parse_config({"privacy": {"retention_days": 30}}, env={})
    short = consent_statement("The Server", cfg)
    long = readme_section(cfg)
    v = _values(cfg)
    assert "The Server" in short and "for 30 days" in short and "(30 by default)" in long
    for p in POINTS:
        assert f"**{p.title}**{p.long.format(**v)[:40]}" in " ".join(long.split())
        for s in p.short:
            assert s.format(**v) in short, (p.key, s)
    # What members are told in both: their replies to each other may be stored.
    assert "replies to other opted-in members" in short
    assert "replies to each other are stored too" in " ".join(long.split())
    assert len(short) < 2000  # one Discord message


# -- may this guild train, and why not -------------------------------------------------------


def test_the_reason_names_the_real_admin_command() -> None:
    cfg = parse_config({"training": {"enabled": True}}, env={})

    class Off:
        guild_id, training_enabled = G, False

    reason = training_block(cfg, Off())
    assert reason is not None and f"(guild {G})" in reason
    command = re.search(r"`/(\w+) (\w+) (\w+)`", reason)
    assert command is not None
    group, name, value = command.groups()
    assert group == GuildTuneCog.tune.name
    cmd = GuildTuneCog.tune.get_command(name)
    assert cmd is not None and value in [c.value for p in cmd.parameters for c in p.choices]


def test_force_skips_the_guild_switch_never_the_operators() -> None:
    on = parse_config({"training": {"enabled": True}}, env={})
    off = parse_config({}, env={})

    class Guild:
        guild_id, training_enabled = G, False

    assert training_block(on, Guild(), force=True) is None
    assert training_block(off, Guild(), force=True) == OPERATOR_OFF
    Guild.training_enabled = True
    assert training_block(on, Guild()) is None


async def test_the_bot_the_worker_the_pipeline_and_the_cli_give_the_same_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The guild's switch off: every surface says ``training_block``'s sentence."""
    s = make_services(tmp_path, training={"enabled": True})
    cfg, store = s.config, s.store
    reason = training_block(cfg, store.guild_settings(G))
    assert reason is not None and "/tune training on" in reason

    with pytest.raises(UserError) as bot_err:
        await Core(s).retrain(G, 5)
    assert str(bot_err.value) == explain(reason) == sentence(reason)

    with pytest.raises(TrainingError) as pipe_err:
        check_allowed(store, cfg, G, force=False)
    assert str(pipe_err.value) == reason

    run_id, _ = store.enqueue_run(G, "schedule")
    run = store.claim_run("w", 60)
    assert run is not None and execute_run(store, cfg, run, "w") == "failed"
    assert store.get_run(run_id).error == reason
    store.close()

    cfg_file = write_config(tmp_path, storage={"data_dir": str(tmp_path)},
                            training={"enabled": True})
    store2 = _store_at(cfg_file)
    store2.grant_consent(G, 5)
    store2.enqueue_run(G, "schedule")
    store2.close()
    assert main(["--config", str(cfg_file), "worker", "--once"]) == 1
    assert f"failed: {reason}" in capsys.readouterr().err


async def test_the_operators_switch_reads_the_same_everywhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = make_services(tmp_path)  # training.enabled defaults to false
    cfg = s.config
    assert training_block(cfg, s.store.guild_settings(G)) == OPERATOR_OFF == OPERATOR_DISABLED
    with pytest.raises(UserError) as bot_err:
        await Core(s).set_training(G, True)
    assert str(bot_err.value) == f"{sentence(OPERATOR_OFF)} {DISCORD_POLICY}"
    with pytest.raises(TrainingError, match=re.escape(OPERATOR_OFF)):
        check_allowed(s.store, cfg, G, force=True)
    s.store.close()

    cfg_file = write_config(tmp_path, storage={"data_dir": str(tmp_path / "d")})
    assert main(["--config", str(cfg_file), "init"]) == 0
    init_out = capsys.readouterr().out
    assert f"training: {OPERATOR_OFF}; set it to true once Discord has allowed" in init_out
    assert main(["--config", str(cfg_file), "status"]) == 0
    assert OPERATOR_OFF in capsys.readouterr().out


def _store_at(cfg_file: Path) -> Store:
    from guildtune.config import load_config
    from storage import open_store

    return open_store(load_config(cfg_file, env={}).db_path)


# Who may read the two switches themselves (everyone else asks guildtune.policy). storage/ keeps
# the guild's switch as a column and is not scanned.
READS_ALLOWED = {
    "guildtune/policy.py": "the home",
    "bot/status.py": "StatusReport shows both switches as facts (the 'Training' field)",
    "guildtune/cli.py": "`guildtune guild` shows the guild's switch it sets, as a fact",
    "bot/runner.py": "spawn_worker starts a worker only when the operator enabled training; "
                     "not part of this change, should call guildtune.policy.operator_block",
}


def test_no_other_module_reads_the_training_switches() -> None:
    found = []
    for pkg in ("bot", "trainer", "guildtune"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Attribute):
                    continue
                guild = node.attr == "training_enabled"
                operator = (node.attr == "enabled" and isinstance(node.value, ast.Attribute)
                            and node.value.attr == "training")
                if (guild or operator) and rel not in READS_ALLOWED:
                    found.append(f"{rel}:{node.lineno}")
    assert not found, ("decide with guildtune.policy.training_block / operator_block: "
                       + ", ".join(found))
