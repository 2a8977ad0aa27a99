"""A real S3 server on loopback for the remote-cache tests: moto's server mode in a child process
on 127.0.0.1 and a free port, with authentication on (an IAM user made for the session), and a
small TCP proxy in front of it that counts the bytes it carries and can cut connections.

``S3Server.env`` is what a bombkd process needs to reach it (made-up credentials,
``AWS_ENDPOINT_URL``, no AWS config files, no instance metadata): nothing reads ``~/.aws`` and
nothing contacts another address.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

SLOW_DOWN = b"503"  # a Proxy cut that answers 503 SlowDown instead of forwarding
MADE_UP = {"AWS_ACCESS_KEY_ID": "AKIDBOOTSTRAP", "AWS_SECRET_ACCESS_KEY": "bootstrap-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(endpoint: str, key: str, secret: str) -> dict[str, str]:
    """AWS settings pointing at ``endpoint`` only."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true", "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1", "HTTP_PROXY": "", "HTTPS_PROXY": "", "http_proxy": "",
            "https_proxy": ""}


class Proxy:
    """Forwards 127.0.0.1:port to ``target``; counts the bytes sent back to clients
    (``bytes_down``) and requests seen (``requests``: connections' first bytes are not parsed,
    so this counts HTTP request lines). ``cut_after(n, times)``: the next ``times`` connections
    are closed after ``n`` bytes from the server (a connection reset mid-shard)."""

    def __init__(self, target: int):
        self.target, self.port = target, free_port()
        self.bytes_down, self.requests, self._cuts = 0, 0, []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.bytes_down = self.requests = 0

    def cut_after(self, n: int, times: int) -> None:
        with self.lock:
            self._cuts = [n] * times

    def throttle(self, times: int) -> None:
        """The next ``times`` connections get S3's 503 SlowDown answer to their request."""
        with self.lock:
            self._cuts = [SLOW_DOWN] * times

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                cut = self._cuts.pop(0) if self._cuts else None
            if cut is SLOW_DOWN:
                threading.Thread(target=_slow_down, args=(client,), daemon=True).start()
                continue
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, False, None),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True, cut),
                             daemon=True).start()

    def _pipe(self, src, dst, down: bool, cut: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if cut is not None and sent + len(data) > cut:
                    dst.sendall(data[:cut - sent])
                    break
                with self.lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        self.requests += data.count(b" HTTP/1.1\r\n")
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


def _slow_down(client: socket.socket) -> None:
    body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>'
            b'Please reduce your request rate.</Message></Error>')
    try:
        client.recv(1 << 16)
        client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except OSError:
        pass
    finally:
        client.close()


class S3Server:
    """moto's S3 server, authenticating requests: the first few (unauthenticated) make an IAM
    user allowed everything; ``env`` carries that user's made-up key."""

    def __init__(self, log: Path):
        self.port = free_port()
        env = {**os.environ, **isolated_env("", **_pair(MADE_UP)),
               "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        env.pop("AWS_ENDPOINT_URL")
        self.log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()
        self.key, self.secret = self._make_user()
        self.proxy = Proxy(self.port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"

    def _wait(self, timeout: float = 60) -> None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited: see {self.log.name}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def _make_user(self) -> tuple[str, str]:
        import boto3
        iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{self.port}",
                           region_name="us-east-1", aws_access_key_id=MADE_UP["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=MADE_UP["AWS_SECRET_ACCESS_KEY"])
        iam.create_user(UserName="bombkd-test")
        iam.put_user_policy(UserName="bombkd-test", PolicyName="all", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", '
            '"Resource": "*"}]}'))
        key = iam.create_access_key(UserName="bombkd-test")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @property
    def env(self) -> dict[str, str]:
        return isolated_env(self.endpoint, self.key, self.secret)

    def bucket(self) -> str:
        """A new empty bucket; its name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}",
                            region_name="us-east-1", aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret)

    def upload(self, folder: Path, url: str) -> str:
        """Every file directly in ``folder`` under the ``s3://bucket/prefix`` URL; the URL."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = self.client()
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                client.upload_file(str(path), bucket, f"{prefix}/{path.name}".lstrip("/"))
        return url

    def keys(self, url: str) -> dict[str, int]:
        """{name: size} of the objects under ``url``."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        found = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"].rsplit("/", 1)[-1]: o["Size"] for o in found}

    def stop(self) -> None:
        self.proxy.close()
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


def _pair(made_up: dict) -> dict:
    return {"key": made_up["AWS_ACCESS_KEY_ID"], "secret": made_up["AWS_SECRET_ACCESS_KEY"]}
