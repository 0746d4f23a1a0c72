"""Streaming calls over real interception, with real clients: every message of a tritonclient
ModelStreamInfer stream is its own call, paired with its answer; an `openai` client's
`stream=True` chat completion is one event with the whole streamed text and the final chunk's
token usage."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
from support import needs_root

from infertap.agent.testbed import openai_server
from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

HTTP_PORT, GRPC_PORT, OPENAI_PORT = 8020, 8021, 8022
PROMPT = "one two three four five six seven eight nine ten eleven twelve"
MESSAGES = 100

# tritonclient.grpc's own streaming API: one bidirectional ModelStreamInfer stream, MESSAGES
# requests on it, each answered before the stream is closed.
STREAM_CLIENT = f"""
import queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(url=sys.argv[1] + ":{GRPC_PORT}")
done = queue.Queue()
client.start_stream(callback=lambda result, error: done.put(error))
for i in range({MESSAGES}):
    x = grpcclient.InferInput("x", [1, 3], "FP32")
    x.set_data_from_numpy(np.array([[i, i + 0.5, -i]], dtype=np.float32))
    client.async_stream_infer("echo", [x])
errors = [done.get(timeout=30) for _ in range({MESSAGES})]
client.stop_stream()
client.close()
assert not any(errors), errors
print("done", flush=True)
"""


# A long-lived stream: half the messages, then it waits (stream open) until told to go on.
HELD_CLIENT = f"""
import queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(url=sys.argv[1] + ":{GRPC_PORT}")
done = queue.Queue()
client.start_stream(callback=lambda result, error: done.put(error))

def send(lo, hi):
    for i in range(lo, hi):
        x = grpcclient.InferInput("held", [1], "INT64")
        x.set_data_from_numpy(np.array([i], dtype=np.int64))
        client.async_stream_infer("echo", [x])
    assert not any(done.get(timeout=30) for _ in range(lo, hi))

send(0, 20)
print("half", flush=True)
sys.stdin.readline()
send(20, 40)
client.stop_stream()
client.close()
print("done", flush=True)
"""


# The official openai client, streaming (and once not, for comparison).
OPENAI_CLIENT = f"""
import sys
import openai
client = openai.OpenAI(base_url="http://" + sys.argv[1] + ":{OPENAI_PORT}/v1", api_key="none")
text = ""
stream = client.chat.completions.create(
    model="tiny-chat", messages=[{{"role": "user", "content": {PROMPT!r}}}],
    stream=True, stream_options={{"include_usage": True}}, temperature=0.5,
)
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage is not None:
        usage = chunk.usage
assert usage is not None and usage.completion_tokens == 12, usage
plain = client.chat.completions.create(
    model="tiny-chat", messages=[{{"role": "user", "content": "not streamed"}}]
)
print(text)
print(plain.choices[0].message.content, flush=True)
"""


@pytest.fixture(scope="module")
def servers(lab: Any) -> Any:
    server = lab.pods["server"]
    start_in_pod(server, HTTP_PORT, GRPC_PORT)
    openai_server.start_in_pod(server, OPENAI_PORT)
    return server


def test_every_message_on_a_v2_grpc_stream_is_its_own_call(
    agent: Any, lab: Any, servers: Any
) -> None:
    rec = agent.recorder
    done = lab.pods["client"].run(
        [sys.executable, "-c", STREAM_CLIENT, servers.ip], capture_output=True, text=True
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]

    def streamed() -> list[Any]:
        return [
            e
            for e in rec.inferences
            if e.endpoint.endswith("/ModelStreamInfer") and e.service.port == GRPC_PORT
        ]

    events = rec.wait_for(lambda: streamed() if len(streamed()) >= MESSAGES else None)
    assert len(events) == MESSAGES  # not one event for the whole stream
    assert [e.stream_index for e in events] == list(range(MESSAGES))
    for i, e in enumerate(events):
        want = np.array([[i, i + 0.5, -i]], dtype=np.float32)
        assert e.model == "echo" and e.protocol == "kserve-v2-grpc" and e.status == "ok"
        assert not e.unpaired and not e.request_truncated and not e.response_truncated
        assert np.array_equal(e.inputs["x"], want)
        assert np.array_equal(e.outputs["x"], want)  # paired with its own answer
        assert e.latency_ns is not None and e.latency_ns > 0
    # Each call's time is its own message's: they were sent one after the other.
    assert all(a.ts_ns <= b.ts_ns for a, b in itertools.pairwise(events))
    assert events[-1].ts_ns > events[0].ts_ns


def test_openai_streamed_chat_completion_is_assembled_with_usage_from_the_final_chunk(
    agent: Any, lab: Any, servers: Any
) -> None:
    rec = agent.recorder
    done = lab.pods["client"].run(
        [sys.executable, "-c", OPENAI_CLIENT, servers.ip], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = " ".join(reversed(PROMPT.split()))
    assert done.stdout.splitlines() == [answer, "streamed not"]

    def chats() -> list[Any]:
        return [
            e for e in rec.inferences if e.protocol == "openai" and e.service.port == OPENAI_PORT
        ]

    events = rec.wait_for(lambda: chats() if len(chats()) >= 2 else None)
    streamed, plain = events
    assert streamed.model == "tiny-chat" and streamed.texts == [PROMPT]
    assert streamed.parameters["stream"] is True and streamed.parameters["temperature"] == 0.5
    # Every delta, not the first chunk's: the whole completion, as the client printed it.
    assert streamed.output_texts == [answer]
    assert streamed.usage == {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24}
    assert not streamed.response_truncated and streamed.error == "" and streamed.status == "ok"
    assert plain.output_texts == ["streamed not"] and plain.usage["completion_tokens"] == 2


def test_calls_on_an_open_stream_come_out_before_it_ends(
    agent: Any, lab: Any, servers: Any
) -> None:
    rec = agent.recorder
    proc = lab.pods["client"].popen(
        [sys.executable, "-c", HELD_CLIENT, servers.ip],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def held() -> list[Any]:
        return [e for e in rec.inferences if "held" in e.inputs and e.service.port == GRPC_PORT]

    try:
        assert proc.stdout.readline().strip() == "half"
        # The stream is still open: its first 20 calls are decoded already, each paired.
        first = rec.wait_for(lambda: held() if len(held()) >= 20 else None)
        time.sleep(0.3)
        assert len(held()) == 20
        assert [e.inputs["held"].tolist() for e in first] == [[i] for i in range(20)]
        assert all(e.outputs["held"].tolist() == e.inputs["held"].tolist() for e in first)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        proc.wait(timeout=30)
    finally:
        lab.pods["client"].kill(proc)
    events = rec.wait_for(lambda: held() if len(held()) >= 40 else None)
    assert [e.stream_index for e in events] == list(range(40))
    assert all(not e.unpaired and e.status == "ok" for e in events)
