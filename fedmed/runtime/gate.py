"""The coordinator's gate: nginx in front of Flower's SuperLink, so only operators control it.

Flower 1.41 serves its Fleet API (sites), Control API (submit, list, log, stop runs; register
and unregister nodes) and Runtime API (the ServerApp's) on ONE HTTP port, and the Control API
has no user authentication in the open-source release. Anyone who can reach that port with the
CA certificate could run code at every site or join as a hospital. fedmed therefore never
exposes the SuperLink: it listens on 127.0.0.1 only, and nginx — a well-known, audited TLS
terminator — listens on the coordinator's public address and routes by path:

    /v1/fleet/...    sites: TLS with the consortium's certificate; Flower's own node
                     authentication (signed requests, registered keys) decides who is a site
    /v1/control/...  operators only: a client certificate issued by the consortium CA with
                     OU=fedmed-operators (``fedmed pki issue-operator``), verified by nginx
                     (mutual TLS); anything else gets 403 before Flower sees the request
    anything else    403 (the Runtime API, docs, OpenAPI schema never leave the host)

A site's node key is an SSH key, not a certificate, and the CA certificate is public: neither
is an operator credential. nginx verifies client certificates with OpenSSL's "SSL client"
purpose, so the coordinator's own server certificate (serverAuth only) is no operator either.
"""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

from fedmed.errors import ConfigError

OPERATOR_OU = "fedmed-operators"

NGINX_CONF = """\
# Written by `fedmed coordinator start`; rewritten at every start. See fedmed/runtime/gate.py.
worker_processes 1;
daemon off;
pid {gate}/nginx.pid;
error_log {gate}/error.log warn;
{user}
events {{ worker_connections 512; }}

http {{
  access_log {gate}/access.log;
  client_body_temp_path {gate}/tmp/body;
  proxy_temp_path {gate}/tmp/proxy;
  fastcgi_temp_path {gate}/tmp/fastcgi;
  uwsgi_temp_path {gate}/tmp/uwsgi;
  scgi_temp_path {gate}/tmp/scgi;
  client_max_body_size 4g;      # model updates travel through here
  proxy_read_timeout 3600s;
  proxy_send_timeout 3600s;
  proxy_request_buffering off;
  proxy_buffering off;
  server_tokens off;

  map "$ssl_client_verify:$ssl_client_s_dn" $fedmed_operator {{
    default 0;
    "~^SUCCESS:(.*,)?OU={ou}(,.*)?$" 1;
  }}

  server {{
    listen {listen} ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client optional;   # sites have no certificate; operators must
    ssl_verify_depth 1;

    proxy_http_version 1.1;
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;   # every coordinator certificate names it (pki)

    location /v1/fleet/ {{
      proxy_pass https://127.0.0.1:{internal};
    }}
    location /v1/control/ {{
      if ($fedmed_operator != 1) {{
        return 403 "fedmed: the Control API needs an operator certificate\\n";
      }}
      proxy_pass https://127.0.0.1:{internal};
    }}
    location / {{
      return 403 "fedmed: not served here\\n";
    }}
  }}
}}
"""


def nginx_bin() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
    )
    if not found:
        raise ConfigError(
            "the coordinator's gate needs nginx, which is not installed; install it "
            "(Debian/Ubuntu: apt-get install nginx-light), or use --insecure for a local "
            "experiment"
        )
    return found


def write_config(
    gate: Path, listen: str, internal_port: int, pki_dir: Path, cert: str, key: str, ca: str
) -> Path:
    """nginx.conf for a gate listening on ``listen`` (host:port) in front of ``internal_port``."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (gate / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    # Run as root (a service manager's choice), nginx would hand its workers to "nobody", who
    # cannot write the temp folders here: keep them as the user that started the coordinator.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    host, _, port = listen.rpartition(":")
    text = NGINX_CONF.format(
        gate=gate.resolve(),
        user=user,
        ou=OPERATOR_OU,
        listen=f"[{host}]:{port}" if ":" in host else listen,
        cert=(pki_dir / cert).resolve(),
        key=(pki_dir / key).resolve(),
        ca=(pki_dir / ca).resolve(),
        internal=internal_port,
    )
    conf = gate / "nginx.conf"
    conf.write_text(text)
    return conf


def command(conf: Path) -> list[str]:
    return [nginx_bin(), "-p", str(conf.parent.resolve()), "-c", str(conf.resolve())]
