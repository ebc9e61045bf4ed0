"""`dockyard nats-auth init --out DIR`: a NATS trust chain for a cluster, and what to do with it.

`functions.devstack.nats_auth.ensure(DIR)` makes the chain (operator, accounts
SYS, DOCKYARD and EVENTING, the services' users, the account signing key; it
reads an existing one back). This command then writes, next to it:

    nats-values.yaml   values for the nats Helm chart (nats-io/k8s, helm/charts/nats):
                       `config.merge` puts the operator JWT, the system account,
                       `resolver: MEMORY` and `resolver_preload` (the account JWTs)
                       into nats.conf, and the leafnode port 7422 (the agent pods'
                       `nats-leaf` sidecars); nats-box's default context uses the admin user
                       from the Secret dockyard-nats-admin (namespace nats-io)
    config-nats.yaml   eventing-natss's ConfigMap `config-nats` (knative-eventing):
                       its `eventing-nats` key with `auth.credentialFile.secret`
                       naming the Secret dockyard-eventing-nats (key nats.creds)

and prints the commands that install the chart with those values and create the
Secrets from DIR's files. Nothing secret is printed: the commands name files.
Rotating is running this again into a new DIR, the commands again, and a rollout.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

NATS_NAMESPACE = "nats-io"
EVENTING_NAMESPACE = "knative-eventing"
SECRET = "dockyard-nats"  # namespace dockyard: the functions' and the stream's users, the launcher's key
ADMIN_SECRET = "dockyard-nats-admin"  # namespace nats-io: nats-box's default context
EVENTING_SECRET = "dockyard-eventing-nats"  # namespace knative-eventing
CREDS_KEY = "nats.creds"  # the key eventing-natss reads by default (and nats-box's default)
VALUES_FILE = "nats-values.yaml"
CONFIG_NATS_FILE = "config-nats.yaml"

# The keys of the Secret dockyard-nats, each a file of the chain (relative to DIR). knative/ mounts them.
SECRET_FILES = {
    "functions.creds": "creds/functions.creds",
    "stream.creds": "creds/stream.creds",
    "tracker.creds": "creds/tracker.creds",
    "signing-key.nk": "signing-key.nk",
    "account.pub": "account.pub",
}
_SERVER_KEYS = ("operator", "system_account", "resolver")
RESTARTS = (
    "kubectl delete pods -n dockyard -l serving.knative.dev/service   # the functions and the stream",
    f"kubectl rollout restart deploy/jetstream-ch-dispatcher -n {EVENTING_NAMESPACE}   # eventing-natss",
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "nats-auth",
        help="make the NATS credentials of a cluster",
        description="`dockyard nats-auth init --out DIR`: make a NATS trust chain (decentralized JWT auth) in DIR, "
        "the nats Helm chart's values and eventing-natss's config-nats for it, and print the commands that install them.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init",
        help="make (or read back) the trust chain in DIR and print how to install it",
        description="Make the trust chain in DIR (kept if it is there already), write DIR/nats-values.yaml and "
        "DIR/config-nats.yaml, and print the helm and kubectl commands. Keep DIR private: it holds every key.",
    )
    init.add_argument("--out", required=True, type=Path, help="directory for the chain (created, mode 0700)")
    init.add_argument("--nats-url", help="NATS URL for eventing-natss (default: DOCKYARD_NATS_URL's default)")
    init.set_defaults(run=run_init)


def server_settings(conf: Path) -> dict:
    """operator, system_account, resolver and resolver_preload of a `server.conf` made by nats_auth.ensure."""
    from functions.cli.client import EXIT_FAILED, CommandError

    settings: dict = {}
    preload: dict[str, str] | None = None
    for number, raw in enumerate(conf.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if preload is not None:  # inside `resolver_preload: {`
            if line == "}":
                settings["resolver_preload"], preload = preload, None
                continue
            key, sep, value = line.partition(":")
        else:
            key, sep, value = line.partition(":")
            if key == "resolver_preload" and value.strip() == "{":
                preload = {}
                continue
        key, value = key.strip(), value.strip()
        if not sep or not key or not value or (preload is None and key not in _SERVER_KEYS):
            raise CommandError(f"{conf}:{number}: not a line of the trust chain's server.conf: {line[:40]!r}", EXIT_FAILED)
        (preload if preload is not None else settings)[key] = value
    if preload is not None:
        raise CommandError(f"{conf}: incomplete server.conf (resolver_preload has no closing brace)", EXIT_FAILED)
    missing = [key for key in (*_SERVER_KEYS, "resolver_preload") if key not in settings]
    if missing:
        raise CommandError(f"{conf}: incomplete server.conf (missing {', '.join(missing)})", EXIT_FAILED)
    return settings


def helm_values(server: dict) -> dict:
    """Values for the nats chart: its `config.merge` is merged into nats.conf as it is (operator mode);
    the leafnode port (7422) is where each agent pod's `nats-leaf` sidecar connects as the task's agent user."""
    return {
        "config": {"merge": server, "leafnodes": {"enabled": True, "port": 7422}},
        "natsBox": {"contexts": {"default": {"creds": {"secretName": ADMIN_SECRET, "key": CREDS_KEY}}}},
    }


def config_nats(nats_url: str) -> dict:
    """eventing-natss's ConfigMap: `eventing-nats` (YAML in a string) with the credentials Secret."""
    import yaml

    eventing_nats = {
        "url": nats_url,
        "auth": {"credentialFile": {"secret": {"name": EVENTING_SECRET, "key": CREDS_KEY}}},
        "connOpts": {"retryOnFailedConnect": True, "maxReconnects": 5, "reconnectWaitMilliseconds": 2000,
                     "reconnectJitterMilliseconds": 100, "reconnectJitterTLSMilliseconds": 1000},
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "config-nats", "namespace": EVENTING_NAMESPACE},
        "data": {"eventing-nats": yaml.safe_dump(eventing_nats, sort_keys=False)},
    }


def _block_dumper():
    import yaml

    class BlockDumper(yaml.SafeDumper):
        """Multi-line strings as `|` blocks (config-nats's `eventing-nats` is YAML in a string)."""

    def text(dumper, value: str):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    BlockDumper.add_representer(str, text)
    return BlockDumper


def commands(directory: Path) -> list[str]:
    """The shell commands that install the chain of `directory` (re-runnable: Secrets are applied)."""
    from agent import contract

    d = directory

    def secret(name: str, namespace: str, files: dict[str, Path]) -> str:
        sources = " ".join(f"--from-file={key}={shlex.quote(str(path))}" for key, path in files.items())
        return (f"kubectl create secret generic {name} -n {namespace} {sources} "
                "--dry-run=client -o yaml | kubectl apply -f -")

    return [
        f"helm upgrade --install nats nats/nats -n {NATS_NAMESPACE} --create-namespace -f {shlex.quote(str(d / VALUES_FILE))} "
        "--set config.jetstream.enabled=true --set config.jetstream.fileStore.pvc.size=10Gi",
        secret(ADMIN_SECRET, NATS_NAMESPACE, {CREDS_KEY: d / "creds" / "admin.creds"}),
        secret(SECRET, contract.FUNCTIONS_NAMESPACE, {key: d / path for key, path in SECRET_FILES.items()}),
        secret(EVENTING_SECRET, EVENTING_NAMESPACE, {CREDS_KEY: d / "creds" / "eventing.creds"}),
        f"kubectl apply -f {shlex.quote(str(d / CONFIG_NATS_FILE))}",
    ]


def run_init(args, out=None) -> int:
    import yaml

    from functions.cli.client import EXIT_BAD_INPUT, EXIT_OK, CommandError

    _BlockDumper = _block_dumper()
    from functions.core.settings import Settings
    from functions.devstack.nats_auth import ensure

    out = out or sys.stdout
    directory: Path = args.out.resolve()
    if directory.exists() and not directory.is_dir():
        raise CommandError(f"--out {args.out}: not a directory", EXIT_BAD_INPUT)
    try:
        auth = ensure(directory)
    except OSError as exc:
        raise CommandError(f"--out {args.out}: {exc.strerror or exc}", EXIT_BAD_INPUT) from None
    values = helm_values(server_settings(auth.server_conf))
    (directory / VALUES_FILE).write_text(
        "# Values for the nats Helm chart (nats-io/k8s helm/charts/nats): operator mode with the trust chain\n"
        "# of this directory. Made by `dockyard nats-auth init`; public keys and JWTs only, no seeds.\n"
        + yaml.safe_dump(values, sort_keys=False, width=10_000))
    (directory / CONFIG_NATS_FILE).write_text(
        "# eventing-natss's settings: its NATS user is the Secret dockyard-eventing-nats (account EVENTING).\n"
        + yaml.dump(config_nats(args.nats_url or Settings.default("nats_url")), Dumper=_BlockDumper, sort_keys=False))
    print(f"NATS trust chain in {directory} (account DOCKYARD {auth.account}). Keep the directory private: "
          "keys/ holds the operator's and accounts' seeds.\n", file=out)
    print("Install it (NATS first; create the namespaces with `kubectl apply -f knative/namespaces.yaml`):\n", file=out)
    for line in commands(directory):
        print(f"  {line}", file=out)
    print("\nThen restart what connects to NATS (on a rotation, NATS itself first: "
          f"`kubectl rollout restart statefulset/nats -n {NATS_NAMESPACE}`):", file=out)
    for line in RESTARTS:
        print(f"  {line}", file=out)
    return EXIT_OK
