"""Server streams over HTTP: Server-Sent Events, or NDJSON on request.

Each message goes out with a resume position:

- a stream with a `resume_token` in its request (SubscribeDelays) uses each
  response's `resume_token`: a reconnecting client sends it back as `Last-Event-ID`
  and the gateway passes it on as the request's `resume_token`;
- a state stream (WatchShipment, WatchByToken: each message is the whole current
  state, the first one the state at subscription) uses a digest of the message: on
  resume, a first message equal to the one the client saw last is not sent again.

SSE: `id:` is the position, `data:` the message's canonical JSON on one line, a
comment line `: heartbeat` when idle, and a failure as `event: error` whose data is
the google.rpc.Status JSON (the stream then ends). NDJSON (`Accept:
application/x-ndjson`): one object per line, `{"id": ..., "result": {...}}` or
`{"error": {...}}`, and an empty line as heartbeat. A stream that ends normally
(server shutdown) simply ends: reconnect and resume.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from services.http_gateway.errors import status_json

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
#: Milliseconds an EventSource waits before reconnecting.
RETRY_MS = 2000


def wants_ndjson(accept: str) -> bool:
    """NDJSON when the client asks for it (and not for SSE first); SSE otherwise."""
    kinds = [part.split(";")[0].strip() for part in accept.split(",")]
    if NDJSON in kinds:
        return SSE not in kinds or kinds.index(NDJSON) < kinds.index(SSE)
    return False


def resumes_by_token(request: Message) -> bool:
    return "resume_token" in request.DESCRIPTOR.fields_by_name


def position(request: Message, response: Message) -> str:
    """The resume position of `response` (see the module doc)."""
    if resumes_by_token(request):
        return str(getattr(response, "resume_token", ""))
    digest = hashlib.sha256(response.SerializeToString(deterministic=True)).digest()
    return base64.urlsafe_b64encode(digest[:15]).decode()


def _json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"))


class Framing:
    """How messages, heartbeats and errors are written for one stream."""

    def __init__(self, ndjson: bool) -> None:
        self.ndjson = ndjson
        self.content_type = NDJSON if ndjson else SSE

    def opening(self) -> bytes:
        return b"" if self.ndjson else f"retry: {RETRY_MS}\n\n".encode()

    def message(self, event_id: str, message: Message) -> bytes:
        if self.ndjson:
            return f'{{"id":{json.dumps(event_id)},"result":{_json(message)}}}\n'.encode()
        return f"id: {event_id}\ndata: {_json(message)}\n\n".encode()

    def heartbeat(self) -> bytes:
        return b"\n" if self.ndjson else b": heartbeat\n\n"

    def error(self, status: Any) -> bytes:
        body = json.dumps(status_json(status), separators=(",", ":"))
        if self.ndjson:
            return f'{{"error":{body}}}\n'.encode()
        return f"event: error\ndata: {body}\n\n".encode()
