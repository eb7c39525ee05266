"""avpbench's mitmproxy addon: what avpd does, the way a mitmproxy-based design does it.

A request whose Authorization header holds the placeholder gets the real secret instead,
after one audit line was appended and fsynced (so the decision is durable before the
request goes upstream, as avpd's I7 demands). SSE responses are streamed, so mitmproxy is
measured with its best settings for streaming.
"""
import json
import os
import time

PLACEHOLDER = os.environ["AVPBENCH_PLACEHOLDER"]
REAL = os.environ["AVPBENCH_REAL"]


class Swap:
    def __init__(self):
        self.fd = os.open(os.environ["AVPBENCH_AUDIT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # requestheaders, not request: with stream_large_bodies a large upload is streamed
    # upstream before the request hook would run, so the swap must happen on the headers.
    def requestheaders(self, flow):
        value = flow.request.headers.get("authorization")
        if value is None or PLACEHOLDER not in value:
            return
        line = json.dumps({
            "ts": time.time(), "type": "decision", "decision": "inject",
            "sni": flow.request.pretty_host, "method": flow.request.method,
            "path": flow.request.path.split("?", 1)[0],
        }) + "\n"
        os.write(self.fd, line.encode())
        os.fsync(self.fd)
        flow.request.headers["authorization"] = value.replace(PLACEHOLDER, REAL)

    def responseheaders(self, flow):
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            flow.response.stream = True


addons = [Swap()]
