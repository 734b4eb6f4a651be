#!/usr/bin/env bash
# The README's console transcript, made with the code as it is: a throwaway data dir, the demo's
# "harbor" community imported as guild 42 (dated yesterday: retention keeps it), then one
# scripted `guildtune console` session (consent, chat, rate, suggest, retrain, wait, the new
# version answers, forget). The tiny model has random weights: its first reply is noise.
#   bash bench/console_session.sh [> transcript.txt]        (about 1-2 min on a 2-core CPU)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cat > "$work/config.toml" <<TOML
[model]
name = "tiny"
max_new_tokens = 24
temperature = 0.3
[storage]
data_dir = "$work/data"
[training]
enabled = true
epochs = 6.0
max_steps = 100
learning_rate = 5e-3
TOML
(cd "$work" && "$py" - <<'PY'
import json
from datetime import UTC, datetime, timedelta
from guildtune.demo_script import HARBOR, history
t0 = datetime.now(UTC) - timedelta(days=1)
with open("harbor.jsonl", "w") as f:
    for i, m in enumerate(history(HARBOR, 120)):
        f.write(json.dumps({"community": "harbor", "part": 0, "seq": m.message_id,
                            "time": f"{t0 + timedelta(minutes=i):%Y-%m-%dT%H:%M:%S}",
                            "author_id": m.user_id, "text": m.text,
                            "reply_to": list(m.reply_to)}) + "\n")
PY
)
"$py" -m guildtune --config "$work/config.toml" import --guild 42 --learn-from-humans \
    "$work/harbor.jsonl" >/dev/null
"$py" -m guildtune --config "$work/config.toml" console --guild 42 <<'SESSION'
/consent on
what do you think about the weather?
/rate +
/suggest arr matey, the weather be fine for sailing!
/tune training on
/tune retrain
/wait
what do you think about the weather?
/forget
yes
/quit
SESSION
