"""Drives the relay with the official Anthropic Python SDK, as a user would.

Run by proxy/tests/sdk.rs with RELAY_URL set; exits non-zero on the first
expectation that fails.
"""
import os
import sys

import anthropic

relay = os.environ["RELAY_URL"]
client = anthropic.Anthropic(base_url=relay, api_key="relay-key-for-tests", max_retries=0)
ask = dict(model="claude-test", max_tokens=64, messages=[{"role": "user", "content": "Hello"}])

# Plain message: parsed by the SDK, upstream request id visible.
message = client.messages.create(**ask)
assert message.type == "message" and message.content[0].type == "text", message
assert message.usage.output_tokens == 180, message.usage
assert message._request_id == "req_mock_0123456789", message._request_id

# Streaming: the SDK's own SSE parser reassembles the text.
with client.messages.stream(**ask, extra_headers={"x-mock": "stream", "x-mock-delay-ms": "5"}) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text == "Hello, relayed world!", text
assert final.usage.output_tokens == 15, final.usage

# count_tokens and models through the same client.
assert client.messages.count_tokens(model="claude-test", messages=ask["messages"]).input_tokens == 42
assert [m.id for m in client.models.list()] == ["claude-test"]

# Upstream errors reach the SDK as its usual exceptions.
try:
    client.messages.create(**ask, extra_headers={"x-mock": "status-529"})
    sys.exit("expected an overloaded error")
except anthropic.APIStatusError as e:
    assert e.status_code == 529 and e.body["error"]["type"] == "overloaded_error", e.body

# An error event after the 200 is raised by the SDK's stream.
try:
    with client.messages.stream(**ask, extra_headers={"x-mock": "stream-error"}) as stream:
        for _ in stream:
            pass
    sys.exit("expected the stream's error event to raise")
except anthropic.APIStatusError as e:
    assert "Overloaded" in str(e), e

# Errors the relay makes itself parse as Claude API errors.
bad = anthropic.Anthropic(base_url=relay, api_key="not-a-relay-key", max_retries=0)
try:
    bad.messages.create(**ask)
    sys.exit("expected AuthenticationError")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
    assert e.request_id and e.request_id.startswith("relay_"), e.request_id
try:
    client.messages.create(**ask, extra_headers={"x-mock": "stall"}, timeout=30)
    sys.exit("expected a timeout from the relay")
except anthropic.APIStatusError as e:
    assert e.status_code == 504 and e.body["error"]["type"] == "api_error", e.body

# Last, since it rests the only upstream key for the 7 s it asks.
try:
    client.messages.create(**ask, extra_headers={"x-mock": "status-429"})
    sys.exit("expected RateLimitError")
except anthropic.RateLimitError as e:
    assert e.response.headers["retry-after"] == "7"

print("python sdk: all checks passed")
