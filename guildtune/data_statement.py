"""The member-facing data statement (Red's end-user data statement), written once.

``POINTS`` holds what guildtune tells members about their data, each point in two lengths: the
README's "Data statement (for your members)" section (``readme_section``, between the
``<!-- data-statement:start -->`` and ``<!-- data-statement:end -->`` markers) and the short form
/consent shows in Discord and the console (``consent_statement``). A test fails when the README
drifts from this module; ``python -m guildtune.data_statement --write-readme`` regenerates it.
Kernel module: imports nothing of bot/ or trainer/.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import PLACEHOLDER
from storage.postgres import is_postgres_url

START = "<!-- data-statement:start -->"
END = "<!-- data-statement:end -->"
NOTE = ("<!-- generated from guildtune/data_statement.py: edit it there, then run\n"
        "     `python -m guildtune.data_statement --write-readme` -->")
README = Path(__file__).resolve().parents[1] / "README.md"
WIDTH = 96


@dataclass(frozen=True)
class Point:
    """One thing members are told. ``long`` follows the bold ``title`` in the README (it starts
    with its own punctuation); ``short`` is what /consent says of it, sentence by sentence
    (empty: README only). Both are ``str.format`` templates over ``_values``."""

    key: str
    title: str
    long: str
    short: tuple[str, ...] = ()


POINTS: tuple[Point, ...] = (
    Point(
        "stored", "What is stored",
        ", only for members who opted in with `/consent` in that server, and only what they wrote "
        "from the moment they opted in: the messages they sent to the bot, the bot's replies, the "
        "recent channel messages the model saw as context, their 👍/👎 ratings and suggested "
        "replies. When a server's admins turn on learning from members' own replies, opted-in "
        "members' replies to each other are stored too. A message of a member who has not "
        "opted in (or written before they did) is stored only as the placeholder "
        "`{placeholder}`, and if the bot's reply repeats four or more of its words in a row, "
        "those words are cut from the stored reply (`[…]`). Mentions are stored as names "
        "(`@name`), never as Discord ids; ids never reach a training example.",
        (("Your messages that the bot answered, the conversation around them, and the bot's "
          "replies."),
         "Your 👍/👎 on the bot's replies and any better reply you suggest.",
         ("If this server's admins turn on learning from members, your replies to other "
          "opted-in members."))),
    Point(
        "purpose", "What for",
        ": to train that server's adapter, and nothing else. Data never crosses servers: every "
        "row carries its server id, no query mixes two, and a reply or forward of a message "
        "from another server is never followed into the context.",
        (("to tune this server's own version of the model (only when the server's admins and "
          "the bot's operator both enabled training)."),
         "Nothing is shared with other servers.")),
    Point(
        "access", "Who can see it",
        ": the operator of the bot (the person who runs it): the data directory is created "
        "readable by the operator's account only (0700), the database, backups and exports are "
        "0600 (an older database is set to 0600 when opened). Server admins see counts and "
        "like-rates, not messages. Each member can download their own data with `/mydata`, "
        "including what they said that is stored inside other members' conversations with the "
        "bot.",
        ("`/mydata` sends you a copy.",)),
    Point(
        "retention", "How long",
        ": `privacy.retention_days` ({retention_days} by default): the bot (and every training "
        "worker) deletes older interactions and messages a minute after it starts and daily, "
        "whether or not training is on. Imported history keeps its own dates (a file whose "
        "times have no date is dated by the file, else by the day of the import, and the "
        "import says which). An adapter trained before then keeps what it learned; `/forget` "
        "and opting out are the ways to take a member's data out of the model too. Each "
        "imported file is recorded by a hash of its bytes (with its name and counts, no member "
        "data): importing it again stores nothing, and an import never replaces a message "
        "already stored from another file or from live chat.",
        ("{keep}.",)),
    Point(
        "opt_out", "Opting out",
        " (`/consent` → opt out) stops new storage at once and takes what was stored out of "
        "training: no dataset reads it (their turns in other members' conversations are read "
        "as the placeholder), an import of old history does not opt them back in, and the "
        "model versions that learned from it are treated as for `/forget` below. The rows stay "
        "until the member uses `/forget`. Opting in again later covers only what they write "
        "from then on: what they wrote or rated before the opt-out never trains again.",
        ("Opting out stops storage and training on what was stored;",)),
    Point(
        "delete", "How to delete it",
        ": `/forget` deletes every row of the member at once, in one transaction, and takes "
        "them out of other members' rows too, also after they opted out: their turns in stored "
        "conversations become the placeholder, their words quoted in what the bot said (its "
        "replies in any conversation since a version trained on them served, as a model "
        "repeats what it memorised) and in members' suggested replies are cut, and their id "
        "and their mentions (`@name`, for the names Discord gives at the time of the forget) "
        "become `@member`. A name written as a plain word is not searched for (a member called "
        "\"Will\" must not erase everyone's \"will\"). {erase} Every adapter version "
        "trained on their data is marked tainted and is never "
        "served or rolled back to again: the server goes back at once to its last version "
        "without their data (or the base model), and a retrain without them is queued "
        "(`training.strict_forget = true`{strict_default}; with `false` the tainted version "
        "serves until the guild's next training run ends, whatever its outcome, and is "
        "withdrawn at once anyway when training is off for the server, as no retrain would "
        "come). The files of withdrawn versions are deleted by the retention job (a minute "
        "after the bot or a worker starts, then daily) and at once by `guildtune forget`; the "
        "registry keeps a row saying that the version existed. A training run already in "
        "progress when they forget is checked when it publishes: a version that learned from "
        "anyone who is no longer opted in is not kept, and the retrain without them runs after "
        "it. The reply to `/forget` says which of these happened. What stays is a key, a "
        "SHA-256 of server and member id (no text), so that a later import of old chat history "
        "cannot bring them back (opting out leaves the same key); opting in again in that "
        "server removes it. Anyone who holds the database and a member's id can tell from it "
        "that they asked to be forgotten. Deleting or editing a Discord message deletes or "
        "updates what was stored from it.",
        (("`/forget` deletes everything, and model versions that learned from it stop being "
          "used {when} and are retrained without it."),)),
    Point(
        "backups", "Backups",
        " (operator): a backup taken before a forget still holds that member's data, and "
        "restoring it brings their rows back. Keep backups no longer than you need them (well "
        "under `retention_days`), store them as privately as the database, and after a restore "
        "run `guildtune forget --user ID` again for every forget made since the backup was "
        "taken."),
)

# The short form: its title line, the "stored" point as bullets, then labelled lines, each
# gathering the short sentences of some points, then what happens without an opt-in (the README
# says it under "What is stored").
SHORT_TITLE = ("**What guildtune stores in {guild_name}, only if you opt in** (and only what you "
               "write from then on)")
SHORT_LINES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What for", ("purpose",)),
    ("How long", ("retention", "access", "opt_out", "delete")),
)
SHORT_NOT_OPTED_IN = ("If you do not opt in, nothing of yours is stored: in stored conversations "
                      "your words are replaced by a placeholder, and cut from the bot's replies "
                      "that repeat them.")


# What happens to the bytes of deleted rows, per database (``[storage] url``).
ERASE = {
    "sqlite": ("Deleted text is overwritten in the database file (SQLite `secure_delete`) and "
               "the write-ahead log is truncated right after."),
    "postgresql": ("Deleted rows are gone from every query at once and the database server's "
                   "`VACUUM` runs right after to free the space they took, which new data then "
                   "overwrites; the server's write-ahead log and backups keep them as long as "
                   "the operator keeps those."),
}


def _point(key: str) -> Point:
    return next(p for p in POINTS if p.key == key)


def _values(cfg: Any) -> dict[str, Any]:
    """What the templates say of this config: how long data is kept, when a forget takes a
    version out of service, and the defaults the README names."""
    days = cfg.privacy.retention_days
    return {
        "retention_days": days,
        "keep": f"for {days} days" if days > 0 else "until you or an admin delete it",
        "when": "at once" if cfg.training.withdraw_at_once else "when the next training run ends",
        "strict_default": ", the default" if cfg.training.strict_forget else "",
        "placeholder": PLACEHOLDER,
        "erase": ERASE["postgresql" if is_postgres_url(cfg.storage.url) else "sqlite"],
    }


def consent_statement(guild_name: str, cfg: Any) -> str:
    """The plain-words data statement /consent shows: the short form of ``POINTS`` for this
    server and this config (retention period, when a forget takes effect)."""
    v = _values(cfg)
    lines = [SHORT_TITLE.format(guild_name=guild_name)]
    lines += [f"• {s.format(**v)}" for s in _point("stored").short]
    for label, keys in SHORT_LINES:
        text = " ".join(s.format(**v) for k in keys for s in _point(k).short)
        lines.append(f"**{label}:** {text}")
    lines.append(SHORT_NOT_OPTED_IN)
    return "\n".join(lines)


def _wrap_bullet(text: str) -> list[str]:
    """A Markdown bullet wrapped at WIDTH, never inside a `code span` (a placeholder or a
    command stays on one line, so a search of the README finds it)."""
    parts = text.split("`")
    glued = "`".join(p.replace(" ", _NBSP) if i % 2 else p for i, p in enumerate(parts))
    lines = textwrap.wrap(glued, WIDTH, initial_indent="- ", subsequent_indent="  ",
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace(_NBSP, " ") for line in lines]


_NBSP = "\x00"  # stands for a space inside a code span while wrapping


def readme_section(cfg_defaults: Any) -> str:
    """The README's data statement (under its heading), markers included, for the default
    config."""
    v = _values(cfg_defaults)
    out = [START, NOTE, ""]
    for p in POINTS:
        out += _wrap_bullet(f"**{p.title}**{p.long.format(**v)}")
    out += ["", END]
    return "\n".join(out)


def _defaults() -> Any:
    from guildtune.config import parse_config

    return parse_config({}, env={})


def readme_text(readme: str, cfg_defaults: Any) -> str:
    """``readme`` with the section between the markers replaced by ``readme_section``."""
    head, _, rest = readme.partition(START)
    _, found, tail = rest.partition(END)
    if not found:
        raise ValueError(f"README has no {START} ... {END} section")
    return head + readme_section(cfg_defaults) + tail


def main(argv: list[str] | None = None) -> int:
    """``python -m guildtune.data_statement [--write-readme]``: print the README section, or
    rewrite it in README.md."""
    ap = argparse.ArgumentParser(prog="python -m guildtune.data_statement",
                                 description="the member-facing data statement")
    ap.add_argument("--write-readme", action="store_true",
                    help="replace README.md's data statement section with the generated one")
    args = ap.parse_args(argv)
    cfg = _defaults()
    if not args.write_readme:
        sys.stdout.write(readme_section(cfg) + "\n")
        return 0
    old = README.read_text(encoding="utf-8")
    new = readme_text(old, cfg)
    if new != old:
        README.write_text(new, encoding="utf-8")
    print(f"{README}: data statement {'updated' if new != old else 'already up to date'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
