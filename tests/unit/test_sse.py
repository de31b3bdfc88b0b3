"""SSE framing: one event is one `data:` line whatever the text carries."""
import json

from server.protocol import CompletionChoice, CompletionChunk
from server.streaming import sse


def test_line_breaking_characters_are_escaped():
    text = "a\x85b\u2028c\u2029d\ne"
    chunk = CompletionChunk(id="x", created=0, model="m", choices=[CompletionChoice(index=0, text=text)])
    frame = sse(chunk)
    assert frame.endswith("\n\n") and len(frame[:-2].splitlines()) == 1  # str.splitlines is the strictest
    assert json.loads(frame[len("data: "):])["choices"][0]["text"] == text
