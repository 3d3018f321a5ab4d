#!/usr/bin/env python3
"""A stand-in for vman's per-VM metadata channel (bench/ and raw-QEMU checks
only): serves NoCloud `meta-data`, `user-data`, `vendor-data` (and
`network-config` as 404) under /nocloud/ on a unix socket, the way QEMU's
`guestfwd=tcp:169.254.169.254:80-cmd:socat STDIO UNIX-CONNECT:<socket>`
reaches it. Every request is logged to stderr with a monotonic timestamp.

Usage: nocloud.py SOCKET HOSTNAME PUBKEY_FILE [INSTANCE_ID]
"""
import http.server
import os
import socketserver
import sys
import time

sock, hostname, key_file = sys.argv[1], sys.argv[2], sys.argv[3]
instance = sys.argv[4] if len(sys.argv) > 4 else "i-" + hostname
key = open(key_file).read().strip()
FILES = {
    "/nocloud/meta-data": f"instance-id: {instance}\nlocal-hostname: {hostname}\n",
    "/nocloud/user-data": f"#cloud-config\nssh_authorized_keys:\n  - {key}\n",
    "/nocloud/vendor-data": "",
}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = FILES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self):
        return "guest"

    def log_message(self, fmt, *args):
        sys.stderr.write(f"{time.monotonic():.3f} nocloud: {fmt % args}\n")
        sys.stderr.flush()


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


if os.path.exists(sock):
    os.unlink(sock)
with Server(sock, Handler) as srv:
    srv.serve_forever()
