"""``open-clip-starft descriptors``: generation against a local fake chat-completions server
(loopback only), answer parsing, and show / validate / stats."""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from open_clip_starft.tools.descriptors.cli import main
from open_clip_starft.tools.descriptors.client import _retry_after, chat_url
from open_clip_starft.tools.descriptors.parse import (clean_item, concepts_from_answer, parse_items, templates_from_answer,
                                                     to_template)
from open_clip_starft.method.descriptors import load_descriptors
from runs import log_of, make_workspace, metric, run, train_args

SECRET = "sk-test-SECRET123"
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def answer(content, **extra):
    """A scripted chat-completions reply whose message content is ``content``."""
    return {"status": 200, "body": {"id": "x", "object": "chat.completion",
                                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]},
            **extra}


class FakeChatServer:
    """A chat-completions server on 127.0.0.1 that records requests and replays ``script``
    (one entry per request; the last entry repeats). An entry: ``status``, ``body`` (dict, str
    or bytes), ``headers``, ``delay`` (seconds to sleep before answering)."""

    def __init__(self):
        self.script, self.requests = [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "raw": raw})
                step = fake.script[min(len(fake.requests), len(fake.script)) - 1]
                time.sleep(step.get("delay", 0))
                body = step.get("body", b"")
                body = json.dumps(body).encode() if isinstance(body, dict) else body
                body = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(step.get("status", 200))
                    for key, value in step.get("headers", {}).items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out tests)

            do_GET = do_POST  # a followed 302 arrives as a GET: recorded like any request

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.block_on_close = False
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def prompts(self):
        return [json.loads(r["raw"])["messages"][0]["content"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in PROXY_VARS + ("OPENAI_API_KEY",):
        monkeypatch.delenv(name, raising=False)
    fake = FakeChatServer()
    yield fake
    fake.close()


def generate(server, out, *extra):
    return main(["generate", "--endpoint", server.base, "--llm-model", "fake-llm", "--out", str(out),
                 "--backoff", "0.01", *extra])


def one_line_error(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("open-clip-starft: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


CONCEPTS_ANSWER = ("Sure! Here are some spurious correlations:\n\n1. **Background**: the scene behind the object\n"
                   "2. Texture\n3) Resolution.\n\nLet me know if you need more!")
BACKGROUND_ANSWER = ("Here are descriptors for background:\n- In the mountains\n* on the beach.\n"
                     "• surrounded by flowers (common in spring)\n- in the Mountains\n\nThese cover many scenes.")
TEXTURE_ANSWER = 'Sure.\n```json\n["rough texture", "{} with smooth texture.", "\\"fuzzy\\""]\n```\n'
RESOLUTION_ANSWER = "blurred, low resolution, and pixelated"


def test_generate_two_stages_from_answers_in_many_formats(server, tmp_path, capsys):
    server.script = [answer(CONCEPTS_ANSWER), answer(BACKGROUND_ANSWER), answer(TEXTURE_ANSWER),
                     answer(RESOLUTION_ANSWER)]
    out = tmp_path / "llm.txt"
    assert generate(server, out, "--num", "5", "--temperature", "0.3") == 0
    assert load_descriptors(str(out)) == [
        "{} in the mountains.", "{} on the beach.", "{} surrounded by flowers.",
        "{} with rough texture.", "{} with smooth texture.", "fuzzy {}.",
        "blurred {}.", "{} with low resolution.", "pixelated {}."]
    text = out.read_text()
    assert "# concept: background\n{} in the mountains." in text and "# concept: resolution" in text
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert f"# endpoint: {server.base}/chat/completions" in header and "# model: fake-llm" in header
    assert "# temperature: 0.3" in header and "# concepts: background, texture, resolution" in header
    assert any(line.startswith("# date: ") and line.endswith("UTC") for line in header)
    assert any("List possible spurious correlations while classifying natural images. Answer in a word." in line
               for line in header)

    assert [r["path"] for r in server.requests] == ["/v1/chat/completions"] * 4
    first = json.loads(server.requests[0]["raw"])
    assert first["model"] == "fake-llm" and first["temperature"] == 0.3
    prompts = server.prompts()
    assert prompts[0].startswith("List possible spurious correlations while classifying natural images. Answer in a word.")
    assert "3 " in prompts[0]  # asks for --num-concepts items
    assert '"background"' in prompts[1] and "5 " in prompts[1] and "in the mountains" in prompts[1]
    assert "Authorization" not in server.requests[0]["headers"]  # no key set, none sent
    assert "wrote 9 descriptor templates for 3 concepts" in capsys.readouterr().out


def test_given_concepts_skip_stage_one_and_full_url_is_accepted(server, tmp_path):
    server.script = [answer("1. in the snow\n2. on a boat"), answer("1. grainy\n2. in the snow")]
    out = tmp_path / "given.txt"
    assert main(["generate", "--endpoint", server.base + "/chat/completions/", "--llm-model", "m", "--out", str(out),
                 "--concepts", "background", "--concepts", "noise", "--backoff", "0.01"]) == 0
    assert len(server.requests) == 2 and '"noise"' in server.prompts()[1]
    # the duplicate across concepts is written once, in its first group
    assert load_descriptors(str(out)) == ["{} in the snow.", "{} on a boat.", "grainy {}."]
    assert "# concepts prompt: (none: given with --concept)" in out.read_text()


@pytest.mark.parametrize("reply,message", [
    ({"status": 200, "body": "<html>gateway</html>"}, "is not JSON"),
    ({"status": 200, "body": {"id": "x", "object": "chat.completion"}}, "has no choices[0].message.content"),
    ({"status": 200, "body": {"error": {"message": "model not loaded"}}}, "model not loaded"),
])
def test_malformed_answers_are_one_line_errors(server, tmp_path, capsys, reply, message):
    server.script = [reply]
    out = tmp_path / "bad.txt"
    assert generate(server, out, "--concepts", "background") == 2
    line = one_line_error(capsys.readouterr().err)
    assert message in line and server.base in line
    assert not out.exists() and len(server.requests) == 1


def test_429_with_retry_after_then_success(server, tmp_path):
    server.script = [{"status": 429, "body": "slow down", "headers": {"Retry-After": "0"}}, answer("in the fog")]
    out = tmp_path / "retry.txt"
    assert generate(server, out, "--concepts", "weather") == 0
    assert len(server.requests) == 2 and load_descriptors(str(out)) == ["{} in the fog."]


def test_5xx_then_success_backs_off(server, tmp_path):
    server.script = [{"status": 503, "body": "busy"}, {"status": 500, "body": "oops"}, answer("- at night")]
    out = tmp_path / "retry.txt"
    assert generate(server, out, "--concepts", "time") == 0
    assert len(server.requests) == 3 and load_descriptors(str(out)) == ["{} at night."]


def test_time_out_then_success(server, tmp_path):
    server.script = [{**answer("in the rain"), "delay": 1.0}, answer("in the rain")]
    out = tmp_path / "slow.txt"
    assert generate(server, out, "--concepts", "weather", "--timeout", "0.5") == 0
    assert len(server.requests) == 2 and load_descriptors(str(out)) == ["{} in the rain."]


def test_time_out_every_time_is_a_one_line_error(server, tmp_path, capsys):
    server.script = [{**answer("in the rain"), "delay": 1.0}]
    assert generate(server, tmp_path / "x.txt", "--concepts", "weather", "--timeout", "0.5", "--retries", "1") == 2
    line = one_line_error(capsys.readouterr().err)
    assert "after 2 attempts" in line and "timed out after 0.5 s" in line and server.base in line
    assert len(server.requests) == 2


def test_retries_exhausted_on_429(server, tmp_path, capsys):
    server.script = [{"status": 429, "body": "slow down", "headers": {"Retry-After": "0"}}]
    assert generate(server, tmp_path / "x.txt", "--concepts", "c", "--retries", "2") == 2
    assert "after 3 attempts (last: HTTP 429" in one_line_error(capsys.readouterr().err)
    assert len(server.requests) == 3


@pytest.mark.parametrize("content,message", [
    ("", "empty answer"),
    (None, "empty answer"),
    ("Sorry, I cannot help with that request today!", "no usable descriptors"),
])
def test_empty_or_unusable_answer_is_a_one_line_error(server, tmp_path, capsys, content, message):
    server.script = [answer(content)]
    assert generate(server, tmp_path / "x.txt", "--concepts", "background") == 2
    assert message in one_line_error(capsys.readouterr().err)


def test_unusable_concept_list_is_a_one_line_error(server, tmp_path, capsys):
    server.script = [answer("Here are some:\n")]
    assert generate(server, tmp_path / "x.txt") == 2
    assert "no usable concept names" in one_line_error(capsys.readouterr().err)


def test_unreachable_endpoint_names_the_url(tmp_path, capsys, monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    assert main(["generate", "--endpoint", url, "--llm-model", "m", "--out", str(tmp_path / "x.txt"),
                 "--concepts", "c", "--backoff", "0.01"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"cannot reach {url}/chat/completions" in line and "check that the server is running" in line


def test_client_errors_are_not_retried_and_mask_the_key(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", SECRET)
    server.script = [{"status": 401, "body": json.dumps({"error": f"Incorrect API key provided: {SECRET}"})}]
    assert generate(server, tmp_path / "x.txt", "--concepts", "c", "--api-key-env", "MY_KEY") == 2
    captured = capsys.readouterr()
    line = one_line_error(captured.err)
    assert "HTTP 401" in line and SECRET not in line and "***" in line and SECRET not in captured.out
    assert len(server.requests) == 1 and server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"


def test_api_key_is_sent_but_never_printed_or_written(server, tmp_path):
    # a retry and a skipped template, so that stderr has something to say too
    server.script = [{"status": 429, "body": "slow down", "headers": {"Retry-After": "0"}},
                     answer("1. Background\n2. Texture"), answer("1. in the mountains\n2. {} and {}"), answer("1. rough")]
    out = tmp_path / "keyed.txt"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env.update(OPENAI_API_KEY=SECRET, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "open_clip_starft.cli", "descriptors", "generate", "--endpoint", server.base,
               "--llm-model", "fake-llm", "--num-concepts", "2", "--out", str(out), "--backoff", "0.01"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert [r["headers"]["Authorization"] for r in server.requests] == [f"Bearer {SECRET}"] * 4
    assert load_descriptors(str(out)) == ["{} in the mountains.", "rough {}."]
    assert "skipped '{} and {}'" in done.stderr

    for stream in (done.stdout, done.stderr):
        assert SECRET not in stream
    for folder, _, files in os.walk(tmp_path):
        for name in files:
            assert SECRET.encode() not in open(os.path.join(folder, name), "rb").read(), name


def test_a_redirect_to_another_host_is_refused_and_that_host_never_sees_the_key(server, tmp_path, capsys, monkeypatch):
    other = FakeChatServer()  # a second loopback server, another host name and port: it records what reaches it
    other.script = [answer("1. rough")]
    try:
        port = other.server.server_address[1]
        server.script = [{"status": 302, "headers": {"Location": f"http://localhost:{port}/v1/chat/completions"}}]
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        assert generate(server, tmp_path / "x.txt", "--concepts", "texture", "--retries", "0") == 2
        line = one_line_error(capsys.readouterr().err)
        assert f"http://127.0.0.1:{server.server.server_address[1]}" in line and f"http://localhost:{port}" in line
        assert "refused" in line and SECRET not in line
        assert len(server.requests) == 1 and server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
        assert other.requests == []  # the key (and the prompt) never left for the other host
        assert not (tmp_path / "x.txt").exists()
    finally:
        other.close()


def test_a_redirect_on_the_endpoints_own_host_is_followed_with_the_key(server, tmp_path, monkeypatch):
    server.script = [{"status": 302, "headers": {"Location": "/v2/chat/completions"}}, answer("1. rough")]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert generate(server, tmp_path / "y.txt", "--concepts", "texture") == 0
    assert [r["path"] for r in server.requests] == ["/v1/chat/completions", "/v2/chat/completions"]
    assert server.requests[1]["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert load_descriptors(str(tmp_path / "y.txt")) == ["rough {}."]


def test_dry_run_prints_prompts_and_sends_nothing(server, tmp_path, capsys):
    assert main(["generate", "--endpoint", server.base, "--llm-model", "m", "--dry-run", "--num", "7"]) == 0
    out = capsys.readouterr().out
    assert "List possible spurious correlations while classifying natural images. Answer in a word." in out
    assert "list 7 short descriptors" in out and f"{server.base}/chat/completions" in out
    assert main(["generate", "--endpoint", server.base, "--llm-model", "m", "--dry-run", "--concepts", "texture"]) == 0
    assert '"texture"' in capsys.readouterr().out
    assert server.requests == [] and not list(tmp_path.iterdir())


def test_generated_file_trains(server, tmp_path):
    server.script = [answer("1. in the water\n2. on the grass\n3. on the sand\n4. in the snow")]
    out = tmp_path / "generated.txt"
    assert generate(server, out, "--concepts", "background") == 0
    ws = make_workspace(tmp_path, n=64, shards=2)
    result = run(train_args(ws, "generated", "--starft-concepts", str(out), epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric(log_of(ws, "generated"), "Star_loss")


# --- parsing and normalising ---------------------------------------------------------------

@pytest.mark.parametrize("text,items", [
    ("1. a\n2. b", ["a", "b"]),
    ("1) a\n2) b", ["a", "b"]),
    ("Intro:\n- a\n* b\n• c\nOutro line here.", ["a", "b", "c"]),
    ('```json\n["a", "b"]\n```', ["a", "b"]),
    ('Sure:\n```\n["a", "b"]\n```\nDone.', ["a", "b"]),
    ('{"descriptors": ["a", "b"]}', ["a", "b"]),
    ('[{"descriptor": "a"}, {"descriptor": "b"}]', ["a", "b"]),
    ("a, b, and c", ["a", "b", "c"]),
    ("a\nb\n", ["a", "b"]),
    ("Here are some descriptors for you\na", ["a"]),
    ("1. a\n2. " + "word " * 13, ["a"]),
    ("[1] a\n[2] b", ["a", "b"]),
    ("", []),
])
def test_parse_items(text, items):
    assert [i.strip() for i in parse_items(text)] == items


@pytest.mark.parametrize("item,clean", [
    ("  **In the Mountains**  ", "in the Mountains"),
    ('"blurred."', "blurred"),
    ("“on the beach”", "on the beach"),
    ("3. under water", "under water"),
    ("Background: the scene behind", "background"),
    ("Texture – surface patterns", "texture"),
    ("snow-covered (winter)", "snow-covered"),
    ("HDR", "HDR"),
    ("JPEG artifacts", "JPEG artifacts"),
    ("{} in the mountains.", "{} in the mountains."),
    ("{caption} at night", "{} at night"),
    ("[class] at night", "{} at night"),
    ("---", ""),
    ("[]", ""),
])
def test_clean_item(item, clean):
    assert clean_item(item) == clean


@pytest.mark.parametrize("phrase,template", [
    ("in the mountains", "{} in the mountains."),
    ("surrounded by flowers", "{} surrounded by flowers."),
    ("covered in snow", "{} covered in snow."),
    ("lit by candles", "{} lit by candles."),
    ("next to a river", "{} next to a river."),
    ("blurred", "blurred {}."),
    ("snow-covered", "snow-covered {}."),
    ("partially occluded", "partially occluded {}."),
    ("black and white", "black and white {}."),
    ("rough texture", "{} with rough texture."),
    ("blurred background", "{} with blurred background."),
    ("{} at night.", "{} at night."),
])
def test_to_template(phrase, template):
    assert to_template(phrase) == template


def test_templates_are_deduplicated_and_bad_ones_rejected():
    templates, rejected = templates_from_answer("1. In the snow\n2. in the  snow\n3. {} and {}\n4. IN THE SNOW")
    assert templates == ["{} in the snow."] and rejected == ["{} and {}"]


def test_concept_names():
    assert concepts_from_answer("1. **Background**\n2. background\n3. Lighting conditions: light") == \
        ["background", "lighting conditions"]


@pytest.mark.parametrize("endpoint,url", [
    ("http://h:8000/v1", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
    ("https://h/v1/chat/completions", "https://h/v1/chat/completions"),
])
def test_chat_url(endpoint, url):
    assert chat_url(endpoint) == url


def test_bad_endpoint_is_an_error(capsys):
    assert main(["generate", "--endpoint", "localhost:8000", "--llm-model", "m", "--dry-run"]) == 2
    assert "not an http(s) URL" in one_line_error(capsys.readouterr().err)


def test_retry_after_is_capped():
    assert _retry_after({"Retry-After": "0"}) == 0
    assert _retry_after({"Retry-After": "3600"}) == 30
    assert _retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert _retry_after({}) is None


# --- show, validate, stats ------------------------------------------------------------------

def test_show_renders_templates(capsys):
    assert main(["show", "--concepts", "background", "--classname", "cat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 58 and "a photo of a cat in the mountains." in lines
    assert main(["show", "--concepts", "resolution", "--template", "a sketch of the {}."]) == 0
    assert "blurred a sketch of the dog." in capsys.readouterr().out


def test_validate(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("# header\n{} ok.\nno placeholder\n")
    assert main(["validate", "--concepts", "background", "--concepts", "texture,resolution"]) == 0
    assert capsys.readouterr().out.splitlines() == ["OK background: 58 descriptor templates",
                                                    "OK texture,resolution: 74 descriptor templates"]
    assert main(["validate", "--concepts", str(bad)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{bad}:3" in line and "no '{}'" in line


def test_stats_counts_duplicates_and_warns_on_truncation(tmp_path, capsys):
    spec = tmp_path / "mine.txt"
    spec.write_text("{} in the mountains.\n{} In the  Mountains.\n{} on a very long and winding road through "
                    "the old quiet forest near the sea.\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ngreat white shark\n")
    assert main(["stats", "--concepts", str(spec), "--classnames", str(classes), "--context-length", "16"]) == 0
    captured = capsys.readouterr()
    assert f"{spec}: 3 descriptor templates" in captured.out
    assert "near-duplicates: 1 group(s)" in captured.out and "'{} In the  Mountains.'" in captured.out
    assert "'great white shark'" in captured.out
    # "a photo of a great white shark on a very long ... sea." = 22 words + '.' + start/end tokens
    assert "longest spurious caption: 25 tokens (with start/end) of a context of 16" in captured.out
    assert "1 of 3 spurious captions" in captured.err and "truncated" in captured.err

    assert main(["stats", "--concepts", "all"]) == 0
    captured = capsys.readouterr()
    assert "all: 132 descriptor templates" in captured.out and "near-duplicates: none" in captured.out
    assert "of a context of 77 (ViT-B-32)" in captured.out and captured.err == ""


def test_stats_unknown_model_is_an_error(capsys):
    assert main(["stats", "--concepts", "background", "--model", "no-such-model"]) == 2
    assert "unknown --model 'no-such-model'" in one_line_error(capsys.readouterr().err)


def test_old_flag_names_still_work_and_warn(capsys):
    # one vocabulary: --concepts for the descriptor set, --llm-model for a language model; old names kept one release
    assert main(["show", "background", "--classname", "cat"]) == 0
    out = capsys.readouterr()
    assert "a photo of a cat" in out.out and "positional SPEC is now --concepts" in out.err
    assert main(["generate", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--concept", "texture", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "--model is now --llm-model" in err and "--concept is now --concepts" in err
