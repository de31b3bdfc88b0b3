"""Builds the speculative-decoding workloads (run once; the JSONL files are committed).

grounded.jsonl: summarise / edit / extract tasks over real text that ships with
Python (stdlib function source and module documentation), the case where the
answer copies from the prompt. open_chat.jsonl: varied questions with no text
to copy from. Each line: {"id", "kind", "messages"}. Deterministic for a given
Python version; the committed files were made with the one named in their
first record's "python" field.

    python loadtest/workloads/make_workloads.py
"""
from __future__ import annotations

import inspect
import json
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_CHARS = 1400  # ~350-450 tokens of context per prompt

CODE_SOURCES = [
    "textwrap.dedent", "textwrap.indent", "shlex.quote", "shlex.join", "bisect.insort_right", "heapq.nlargest",
    "heapq.merge", "fnmatch.fnmatch", "fnmatch.translate", "posixpath.join", "posixpath.normpath",
    "posixpath.relpath", "string.capwords", "json.dumps", "base64.b64encode", "html.escape",
    "glob.glob", "calendar.isleap", "colorsys.rgb_to_hsv", "colorsys.hsv_to_rgb", "statistics.median",
    "statistics.mode", "difflib.get_close_matches", "keyword.iskeyword", "operator.length_hint",
    "urllib.parse.quote", "urllib.parse.urljoin", "ipaddress.ip_address", "uuid.uuid4", "secrets.token_hex",
    "functools.cmp_to_key", "random.Random.shuffle", "random.Random.choices", "string.Formatter.vformat",
]
DOC_MODULES = [
    "heapq", "bisect", "textwrap", "shlex", "fnmatch", "json", "base64", "colorsys", "statistics", "difflib",
    "argparse", "csv", "pickle", "tempfile", "zipfile", "tarfile", "pprint", "queue", "sched", "contextlib",
    "dataclasses", "enum", "fractions", "decimal", "gettext", "imaplib", "ftplib", "smtplib", "calendar",
    "tokenize", "ast", "inspect",
]
CODE_TASKS = [
    "Add type hints to the following Python function. Reply with the complete function only.\n\n{text}",
    "Rewrite the following Python function with clearer variable names, keeping its behaviour. "
    "Reply with the complete function.\n\n{text}",
]
DOC_TASKS = [
    "Summarise the following documentation in three sentences.\n\n{text}",
    "List every function, class or option named in the following text, one per line, "
    "each with a short quote from the text that mentions it.\n\n{text}",
]
OPEN_QUESTIONS = [
    "What is the difference between weather and climate?", "Give me three tips for a job interview.",
    "Why do cats purr?", "How does compound interest work?", "Suggest a name for a bakery.",
    "What should I pack for a weekend hike?", "Explain recursion to a ten-year-old.",
    "Write a haiku about the sea.", "Why is the sky blue?", "How do I make a paper airplane?",
    "What are the benefits of reading fiction?", "Plan a three-day trip to Rome.",
    "What is a black hole?", "How can I sleep better?", "Tell me a fun fact about octopuses.",
    "What is the capital of Australia and why was it chosen?", "How do bees make honey?",
    "Write a limerick about a programmer.", "What is inflation?", "How do I start learning to draw?",
    "Describe the taste of a mango to someone who has never had one.", "Why do we dream?",
    "What is the best way to learn to cook?", "Explain how a rainbow forms.",
    "Give me a short motivational quote and explain it.", "What makes a good friend?",
    "How do airplanes stay in the air?", "What is the difference between a virus and a bacterium?",
    "Suggest a weekend project for a beginner woodworker.", "How does the stock market work?",
    "Write a two-line poem about coffee.", "Why do leaves change colour in autumn?",
    "How do I politely decline an invitation?", "What is machine learning, in one paragraph?",
    "Invent a new board game and describe its rules briefly.", "What are the phases of the moon?",
    "How can I reduce food waste at home?", "Tell me a short story about a lost key.",
    "What is photosynthesis?", "How do I keep houseplants alive?", "Why is exercise good for the brain?",
    "Compare tea and coffee.", "What causes earthquakes?", "Give me a riddle and its answer.",
    "How do noise-cancelling headphones work?", "What should I know before adopting a dog?",
    "Describe a sunset without using the word 'sun'.", "What is the tallest mountain in the world?",
    "How do I write a good thank-you note?", "Why do onions make you cry?",
    "What are three habits of productive people?", "Explain the rules of chess briefly.",
    "What is democracy?", "How do vaccines work?", "Suggest a vegetarian dinner for four.",
    "What is the speed of light and why does it matter?", "How do I stop procrastinating?",
    "Write a short dialogue between a robot and a cat.", "Why do birds migrate?",
    "What is the difference between a lake and a pond?", "How can I improve my handwriting?",
    "Give me a packing list for a beach holiday.", "Why do we have leap years?",
    "What is the water cycle?", "Describe your ideal city park.",
]


def _code(name: str) -> str:
    import importlib
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        try:
            return inspect.getsource(obj)[:MAX_CHARS]
        except (TypeError, OSError):  # written in C
            return ""
    return ""


def _doc(module: str) -> str:
    import importlib
    return inspect.cleandoc(importlib.import_module(module).__doc__ or "")[:MAX_CHARS]


def grounded() -> list[dict]:
    texts = [("code", t) for t in map(_code, CODE_SOURCES) if len(t) > 200] + \
        [("doc", t) for t in map(_doc, DOC_MODULES) if len(t) > 200]
    rows = []
    for task in range(2):  # every text with each of its kind's two tasks
        for kind, text in texts:
            content = (CODE_TASKS if kind == "code" else DOC_TASKS)[task].format(text=text)
            rows.append({"id": f"grounded-{len(rows)}", "kind": kind,
                         "messages": [{"role": "user", "content": content}]})
    return rows


def open_chat() -> list[dict]:
    return [{"id": f"chat-{i}", "kind": "chat", "messages": [{"role": "user", "content": q}]}
            for i, q in enumerate(OPEN_QUESTIONS)]


def main() -> None:
    for name, rows in (("grounded", grounded()), ("open_chat", open_chat())):
        rows[0]["python"] = platform.python_version()
        with open(HERE / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{name}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
