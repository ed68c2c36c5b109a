"""A fake cloud metadata service on 127.0.0.1 (AWS IMDSv2 spot instance-action, GCE preempted
flag): what `cluster/spot_watcher.py` polls, with no real network."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading


class FakeMetadata:
    """IMDSv2 / GCE metadata imitation: no notice for the first `quiet_polls` polls, then one."""

    def __init__(self, cloud: str, quiet_polls: int, notice_time: str | None = None):
        self.cloud, self.quiet_polls, self.notice_time = cloud, quiet_polls, notice_time
        self.polls = 0
        self.token_requests = 0
        self.bad_requests: list[str] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    fake.token_requests += 1
                    return self._send(200, "tok-123")
                fake.bad_requests.append(f"PUT {self.path}")
                self._send(400)

            def do_GET(self):
                if fake.cloud == "aws" and self.path == "/latest/meta-data/spot/instance-action":
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        fake.bad_requests.append("GET without IMDSv2 token")
                        return self._send(401)
                    fake.polls += 1
                    if fake.polls <= fake.quiet_polls:
                        return self._send(404)
                    return self._send(200, json.dumps({"action": "terminate", "time": fake.notice_time}))
                if fake.cloud == "gcp" and self.path == "/computeMetadata/v1/instance/preempted":
                    if self.headers.get("Metadata-Flavor") != "Google":
                        fake.bad_requests.append("GET without Metadata-Flavor")
                        return self._send(403)
                    fake.polls += 1
                    return self._send(200, "FALSE" if fake.polls <= fake.quiet_polls else "TRUE")
                fake.bad_requests.append(f"GET {self.path}")
                self._send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def in_seconds(seconds: int) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
