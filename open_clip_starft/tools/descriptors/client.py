"""The language-model client: one-message requests to any OpenAI-compatible chat-completions endpoint,
with retries on 429, 5xx, resets and time-outs.

Only the standard library talks HTTP. The API key is sent as ``Authorization: Bearer ...`` only to the
endpoint's scheme, host and port: a redirect elsewhere is refused (urllib would carry the header along);
it is masked in every error message and never printed or written anywhere.
"""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from open_clip_starft.errors import StarftError, one_line

MAX_RETRY_AFTER = 30.0
"""The longest ``Retry-After`` wait honoured, in seconds."""

def chat_url(endpoint: str) -> str:
    """``http://host:8000/v1`` (with or without ``/chat/completions``) -> the full POST URL."""
    url = endpoint.strip().rstrip("/")
    if not re.match(r"https?://[^/]", url):
        raise StarftError(f"--endpoint {endpoint!r} is not an http(s) URL: pass a base URL such as http://127.0.0.1:8000/v1")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url`` (the default port written out), what a credential is bound to."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return f"{parts.scheme.lower()}://{(parts.hostname or '').lower()}:{port}"


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the request's own scheme, host and port (keeping its headers, the
    API key included); a redirect anywhere else is a one-line StarftError naming both, sent nowhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if origin(target) != origin(req.full_url):
            fp.close()
            raise StarftError(f"{origin(req.full_url)} answered HTTP {code} redirecting to another host, {origin(target)}: "
                              "refused, so the API key goes only to the endpoint's host; if you trust that host, pass "
                              "its URL as --endpoint")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _retry_after(headers) -> float | None:
    """Seconds from a ``Retry-After: <seconds>`` header, capped at MAX_RETRY_AFTER; None if absent."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: fall back to the backoff


class ChatClient:
    """Sends one-message chat-completions requests, retrying 429, 5xx, resets and time-outs
    with exponential backoff. Every error message has the API key masked."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, temperature: float,
                 timeout: float, retries: int, backoff: float):
        self.url = chat_url(endpoint)
        self.model = model
        self.temperature = temperature
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._api_key = api_key or None
        self._opener = urllib.request.build_opener(_SameOriginRedirects())  # replaces urllib's redirect handler

    def redact(self, text: str) -> str:
        """``text`` with the API key masked."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def error(self, message: str) -> StarftError:
        """A StarftError whose message has the API key masked."""
        return StarftError(self.redact(message))

    def _post(self, payload: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        with self._opener.open(request, timeout=self.timeout) as response:
            return response.read()

    def _post_with_retries(self, payload: bytes) -> bytes:
        """The response body; retries transient failures, raises StarftError on the others."""
        last = ""
        for attempt in range(self.retries + 1):
            delay = self.backoff * 2 ** attempt
            try:
                return self._post(payload)
            except urllib.error.HTTPError as e:
                body = one_line(e.read().decode("utf-8", "replace"))
                e.close()
                if e.code != 429 and e.code < 500:
                    raise self.error(f"{self.url} answered HTTP {e.code} {e.reason}: {body or '(no body)'}: "
                                      "check --endpoint, --model and the API key variable (--api-key-env)") from None
                last = f"HTTP {e.code} {e.reason}"
                retry_after = _retry_after(e.headers)
                delay = delay if retry_after is None else retry_after
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"timed out after {self.timeout:g} s"
                elif isinstance(e.reason, (ConnectionResetError, ConnectionAbortedError)):
                    last = "connection reset"
                else:
                    raise self.error(f"cannot reach {self.url} ({one_line(e.reason)}): check that the server "
                                      "is running and that --endpoint is right") from None
            except TimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except (ConnectionResetError, ConnectionAbortedError, http.client.HTTPException):
                last = "connection reset"
            if attempt < self.retries:
                time.sleep(delay)
        raise self.error(f"no answer from {self.url} after {self.retries + 1} attempts (last: {last}): "
                          "check the server, or raise --retries / --timeout")

    def ask(self, prompt: str, what: str) -> str:
        """The model's answer to ``prompt`` (``what`` names it in errors)."""
        payload = json.dumps({"model": self.model, "temperature": self.temperature,
                              "messages": [{"role": "user", "content": prompt}]}).encode("utf-8")
        body = self._post_with_retries(payload)
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self.error(f"the answer from {self.url} for {what} is not JSON "
                              f"({one_line(body.decode('utf-8', 'replace'), 80)!r}): "
                              "is --endpoint an OpenAI-compatible API base URL such as http://host:8000/v1?") from None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            raise self.error(f"{self.url} returned an error for {what}: {one_line(data['error'].get('message', ''))}")
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise self.error(f"the answer from {self.url} for {what} has no choices[0].message.content: "
                              "is --endpoint an OpenAI-compatible chat-completions API?") from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str) or not content.strip():
            raise self.error(f"the model {self.model!r} gave an empty answer for {what}: "
                              "try again, or another --model / --temperature")
        return content
