"""The egress proxy's Squid configuration, rendered from the domain allowlist.

Invariants:
- Only allowlisted domains pass (`dstdomain -n`: no reverse DNS, so a PTR record
  of an attacker's IP can never name an allowed domain).
- Even an allowlisted name is refused when it resolves to a private, loopback,
  link-local (cloud metadata 169.254.169.254), CGNAT or otherwise internal
  address, or names the Kubernetes API server: the `dst` deny rules come before
  the allow. Squid checks them on the resolved address before it connects, so
  a refused request never leaves the proxy.
- CONNECT only to port 443; plain HTTP only to 80 and 443.
- Squid keeps no disk cache and logs to stdout/stderr: it runs non-root on a
  read-only root filesystem with emptyDirs for its pid file and spool.

The committed ConfigMap `knative/egress-proxy-config.yaml` is this module's
output for `knative/squid/allowlist.txt`; after editing the allowlist run

    .venv/bin/python -m functions.core.egress

which rewrites the ConfigMap and the config hash annotation on the Deployment
(so the proxy restarts with the new config). `--check` only compares.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from agent import contract

ROOT = Path(__file__).resolve().parents[2]
KNATIVE_DIR = ROOT / "knative"
ALLOWLIST_FILE = KNATIVE_DIR / "squid" / "allowlist.txt"
CONFIGMAP_FILE = KNATIVE_DIR / "egress-proxy-config.yaml"
DEPLOYMENT_FILE = KNATIVE_DIR / "egress-proxy.yaml"

CONFIGMAP_NAME = "egress-proxy-config"
CONFIG_KEY = "squid.conf"
HASH_ANNOTATION = "dockyard.dev/squid-conf-sha256"
PORT = 3128

# Destinations refused even for allowlisted names: where a name may point to
# reach inside the cluster, the node or the cloud provider.
DENY_RANGES = (
    "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host on Linux
    "10.0.0.0/8",  # private (k3s pods 10.42/16, services 10.43/16)
    "100.64.0.0/10",  # carrier-grade NAT, used by some clouds' metadata and VPNs
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local: cloud metadata 169.254.169.254
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255
    "::/128",  # unspecified
    "::1/128",  # loopback
    "fc00::/7",  # unique local (AWS metadata fd00:ec2::254)
    "fe80::/10",  # link-local
)

# The API server by name (the cluster's service names) and by address (the
# `kubernetes` Service's ClusterIP; k3s uses 10.43.0.1, also inside 10/8 above,
# named separately so it stays refused if a cluster's service range is public).
API_SERVER_NAMES = ("kubernetes", "kubernetes.default", ".svc", ".cluster.local")  # .svc covers kubernetes.default.svc
API_SERVER_ADDRESSES = ("10.43.0.1/32",)

# Who may use the proxy: pod addresses (the NetworkPolicy narrows it to agents).
CLIENT_RANGES = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10")

SAFE_PORTS = (80, 443)
SSL_PORTS = (443,)

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DOMAIN = re.compile(rf"^\.?{_LABEL}(\.{_LABEL})*$")


class AllowlistError(ValueError):
    """An allowlist entry Squid would misread; the message names the line."""


def parse_allowlist(text: str, source: str = "allowlist") -> list[str]:
    """Domains, one a line (`#` comments); a leading dot also allows subdomains."""
    domains: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        where = f"{source}:{number}"
        try:
            ipaddress.ip_address(entry.strip("[]"))
        except ValueError:
            pass
        else:
            raise AllowlistError(f"{where}: {entry!r} is an address; allow a domain name instead")
        if not _DOMAIN.match(entry) or "." not in entry.strip("."):
            raise AllowlistError(f"{where}: {entry!r} is not a domain like 'pypi.org' or '.github.com'")
        for other in domains:
            if _covers(other, entry) or _covers(entry, other):
                # Squid refuses to start when one dstdomain entry covers another.
                raise AllowlistError(f"{where}: {entry!r} overlaps {other!r}; keep one of them")
        domains.append(entry)
    if not domains:
        raise AllowlistError(f"{source}: no domains; the proxy would refuse everything")
    return domains


def _covers(wide: str, narrow: str) -> bool:
    """True when the dstdomain entry `wide` matches every name `narrow` matches."""
    if wide == narrow:
        return True
    return wide.startswith(".") and (narrow.endswith(wide) or narrow == wide[1:])


def read_allowlist(path: Path = ALLOWLIST_FILE) -> list[str]:
    return parse_allowlist(Path(path).read_text(), str(path))


def render_squid_conf(
    allowed: Iterable[str],
    *,
    port: int | str = PORT,
    deny_ranges: Sequence[str] = DENY_RANGES,
    api_server_names: Sequence[str] = API_SERVER_NAMES,
    api_server_addresses: Sequence[str] = API_SERVER_ADDRESSES,
    clients: Sequence[str] = CLIENT_RANGES,
    safe_ports: Sequence[int] = SAFE_PORTS,
    ssl_ports: Sequence[int] = SSL_PORTS,
    pid_file: str = "/run/squid/squid.pid",
    spool_dir: str = "/var/spool/squid",
    access_log: str = "stdio:/dev/stdout",
    cache_log: str = "/dev/stderr",
) -> str:
    """squid.conf for the allowlist. Every keyword has the production default; tests
    narrow `deny_ranges` and move ports and paths (see tests/manifests/test_egress.py)."""
    allowed = list(allowed)
    for value in (*deny_ranges, *api_server_addresses, *clients):
        ipaddress.ip_network(value)  # a typo here must fail loudly, not open the proxy

    def acl(name: str, kind: str, values: Iterable[object]) -> list[str]:
        return [f"acl {name} {kind} {value}" for value in values]

    lines = [
        "# Egress proxy of the dockyard agents. Rendered by functions/egress.py from",
        "# knative/squid/allowlist.txt: edit that file, then run `python -m functions.core.egress`.",
        "",
        f"http_port {port}",
        "visible_hostname egress-proxy",
        "",
        "# Who may connect, where, and how.",
        *acl("clients", "src", clients),
        *acl("safe_ports", "port", safe_ports),
        *acl("ssl_ports", "port", ssl_ports),
        "acl CONNECT method CONNECT",
        "",
        "# Allowed destinations by name. -n: never by reverse DNS of an address.",
        *acl("allowed_domains", "dstdomain -n", allowed),
        "",
        "# Refused destinations, even for allowed names. `dst` resolves the name and",
        "# matches if any of its addresses is in a range; Squid decides before connecting.",
        *acl("internal_addresses", "dst", deny_ranges),
        *acl("api_server", "dstdomain -n", api_server_names),
        *acl("api_server_addresses", "dst", api_server_addresses),
        "",
        "# Order matters: the first matching rule decides.",
        "http_access deny !clients",
        "http_access deny !safe_ports",
        "http_access deny CONNECT !ssl_ports",
        "http_access deny api_server",
        "# Names off the list are refused before any DNS lookup.",
        "http_access deny !allowed_domains",
        "http_access deny api_server_addresses",
        "http_access deny internal_addresses",
        "http_access allow allowed_domains",
        "http_access deny all",
        "",
        "# Forward only: no cache on disk, nothing about the client passed on.",
        "cache deny all",
        "cache_mem 0 MB",
        "forwarded_for delete",
        "httpd_suppress_version_string on",
        "",
        "# Runs non-root on a read-only root filesystem: logs to the container's streams,",
        "# pid file and spool on emptyDirs, no ICMP helper, no netdb state file.",
        f"pid_filename {pid_file}",
        f"coredump_dir {spool_dir}",
        f"access_log {access_log}",
        f"cache_log {cache_log}",
        "cache_store_log none",
        "logfile_rotate 0",
        "pinger_enable off",
        "netdb_filename none",
        "shutdown_lifetime 5 seconds",
    ]
    return "\n".join(lines) + "\n"


def config_hash(conf: str) -> str:
    return hashlib.sha256(conf.encode()).hexdigest()[:16]


def render_configmap(conf: str) -> str:
    """The ConfigMap manifest (YAML text) holding `conf`."""
    header = [
        "# Generated by `python -m functions.core.egress` from knative/squid/allowlist.txt: do not edit by hand.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {CONFIGMAP_NAME}",
        f"  namespace: {contract.FUNCTIONS_NAMESPACE}",
        "  labels:",
        "    app.kubernetes.io/name: egress-proxy",
        "    app.kubernetes.io/part-of: dockyard",
        "data:",
        f"  {CONFIG_KEY}: |",
    ]
    body = [f"    {line}" if line else "" for line in conf.splitlines()]
    return "\n".join(header + body) + "\n"


_ANNOTATION_LINE = re.compile(rf'^(\s*{re.escape(HASH_ANNOTATION)}:\s*)"?[0-9a-f]*"?\s*$', re.MULTILINE)


def with_config_hash(deployment_text: str, digest: str) -> str:
    """The Deployment manifest text with its config hash annotation set to `digest`."""
    updated, count = _ANNOTATION_LINE.subn(lambda m: f'{m.group(1)}"{digest}"', deployment_text)
    if count != 1:
        raise ValueError(f"expected one '{HASH_ANNOTATION}:' line in the Deployment, found {count}")
    return updated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functions.core.egress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--allowlist", type=Path, default=ALLOWLIST_FILE)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the files are stale")
    args = parser.parse_args(argv)
    try:
        conf = render_squid_conf(read_allowlist(args.allowlist))
    except AllowlistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wanted = {
        CONFIGMAP_FILE: render_configmap(conf),
        DEPLOYMENT_FILE: with_config_hash(DEPLOYMENT_FILE.read_text(), config_hash(conf)),
    }
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run `python -m functions.core.egress`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
