"""docs/getting-feedback-in.md, run from its own code blocks against the real
broker: votes over HTTP (curl and httpx), from a Kafka producer and from two tools'
exports, all stored by `kto-loop ingest`.

The ```sh and ```python blocks run in order as one script (the ```html one is a browser
snippet). What differs from a user's terminal, and why:

- the page's fixed addresses become the session's: its broker for 127.0.0.1:9092, a
  free port for the endpoint's 127.0.0.1:8088, a fresh topic for chat-feedback;
- `KTO_LOOP_CONFIG` names a config for them (the page runs with the local
  stack's), and the user hash key comes from the environment, as there;
- the script runs in a fresh directory whose `tests/` is the repository's, so the
  example exports are where the page says and the import reports land there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from connectors.feedback.store import FEEDBACK, FeedbackStore
from deploy.local.broker import free_port
from pipeline.feedback.events import hash_user
from tests.conftest import HASH_KEY, KafkaSetup

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "getting-feedback-in.md"


def readme_blocks() -> list[tuple[str, str]]:
    """The page's (language, code) blocks, in order."""
    return re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(), re.S)


def script(blocks: list[tuple[str, str]]) -> str:
    parts = ["set -euo pipefail"]
    for language, code in blocks:
        if language == "sh":
            parts.append(code)
        elif language == "python":
            parts.append(f"python - <<'PYTHON'\n{code}PYTHON\n")
    return "\n".join(parts)


def test_the_section_walks_through_all_three_ways() -> None:
    blocks = readme_blocks()
    languages = [language for language, _ in blocks]
    assert languages.count("python") == 2 and "html" in languages
    code = "\n".join(c for _, c in blocks)
    for step in ("kto-loop serve-feedback", "jwt.encode", "X-User-Token", "httpx.post",
                 "KafkaProducer", "kto-loop import"):  # fmt: skip
        assert step in code, step


def test_every_way_in_the_readme_lands_in_the_store(kafka_setup: KafkaSetup, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "tests").symlink_to(ROOT / "tests")
    port = free_port()
    config = kafka_setup.config_file({"feedback_http": {"port": port}})
    text = (
        script(readme_blocks())
        .replace("127.0.0.1:8088", f"127.0.0.1:{port}")
        .replace("127.0.0.1:9092", kafka_setup.broker.bootstrap)
        .replace('"chat-feedback"', f'"{kafka_setup.topic}"')
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "KTO_LOOP_CONFIG": str(config),
        "KTO_LOOP_EVENTS__USER_HASH_KEY": HASH_KEY,
    }
    done = subprocess.run(
        ["bash", "-c", text], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    stored = FeedbackStore(str(kafka_setup.tmp / "store")).read(FEEDBACK)
    ids = set(stored["event_id"])
    # curl with the backend's key, in its namespace; the Kafka producer, as sent
    assert {"k.backend:readme-1", "readme-kafka-1"} <= ids
    # httpx with the browser key and a token the backend signed: bob's namespace
    (token_vote,) = [i for i in ids if i.startswith("u.")]
    assert len(token_vote.split(":")[1]) == 36 and token_vote.count("-") == 4
    by_id = stored.set_index("event_id")
    assert by_id.loc[token_vote, "user_hash"] == hash_user("bob", HASH_KEY.encode())
    assert any(i.startswith("openwebui:") for i in ids)
    assert any(i.startswith("langsmith:") for i in ids)
    rows_line = next(line for line in done.stdout.splitlines() if "feedback rows" in line)
    assert f" {len(stored):,} " in rows_line  # `kto-loop store`, last
    assert (work / "langsmith-report.jsonl").exists()
    assert (work / "import-openwebui-report.jsonl").exists()
