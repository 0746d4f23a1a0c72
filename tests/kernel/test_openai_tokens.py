"""Token usage of OpenAI-style calls, over real interception, with the official `openai` client
against the testbed's OpenAI-compatible server: `infertap_tokens_total{model,kind}` grows by
exactly the usage the client was told, and each inference event carries it."""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

import pytest
from support import needs_root

from infertap.agent.testbed import openai_server

pytestmark = [needs_root, pytest.mark.kernel]

PORT = 8032
MODEL = "tokens-chat"
CLIENT = f"""
import json, sys
import openai
client = openai.OpenAI(base_url="http://" + sys.argv[1] + ":{PORT}/v1", api_key="none")
seen = []
plain = client.chat.completions.create(
    model={MODEL!r}, messages=[{{"role": "user", "content": "how many tokens are these"}}]
)
seen.append(plain.usage.model_dump())
stream = client.chat.completions.create(
    model={MODEL!r}, messages=[{{"role": "user", "content": "one two three"}}],
    stream=True, stream_options={{"include_usage": True}},
)
for chunk in stream:
    if chunk.usage is not None:
        seen.append(chunk.usage.model_dump())
print(json.dumps(seen), flush=True)
"""


def tokens(agent: Any) -> dict[str, float]:
    page = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
    out = {}
    for line in page.splitlines():
        if line.startswith("infertap_tokens_total{") and f'model="{MODEL}"' in line:
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = float(line.rsplit(" ", 1)[1])
    return out


def test_openai_token_usage_is_exported_and_in_events(agent: Any, lab: Any) -> None:
    openai_server.start_in_pod(lab.pods["server"], PORT)
    before = tokens(agent)
    sub = agent.events.subscribe(frozenset({"inference"}), maxlen=10_000)
    try:
        r = lab.pods["client"].run(
            [sys.executable, "-c", CLIENT, lab.pods["server"].ip],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        usages = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(usages) == 2 and all(u["total_tokens"] > 0 for u in usages)
        rec = agent.recorder
        rec.wait_for(lambda: len([e for e in rec.inferences if e.model == MODEL and e.usage]) >= 2)
        published: list[dict[str, Any]] = []
        while (ev := sub.get(timeout=0.5)) is not None:
            if ev.data.get("model") == MODEL:
                published.append(ev.data)
    finally:
        sub.close()
    expected = {
        kind: sum(u[f"{kind}_tokens"] for u in usages) for kind in ("prompt", "completion", "total")
    }
    after = tokens(agent)
    assert {k: after[k] - before.get(k, 0.0) for k in after} == expected
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert sorted(tuple(d["usage"][k] for k in keys) for d in published) == sorted(
        tuple(u[k] for k in keys) for u in usages
    )
