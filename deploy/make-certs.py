#!/usr/bin/env python3
"""Make a vas CA and the certificates of a cluster (see deploy/README.md, "Mutual TLS").

    /opt/vas/.venv/bin/python deploy/make-certs.py /etc/vas/ca \\
        --coordinator --node worker-17 --node worker-18 --user 0:0 --etcd etcd1 --etcd 10.0.0.5

writes into DIR: ``ca.pem`` and ``ca-key.pem`` (made once; later runs reuse them to add
certificates), and per holder ``NAME.pem`` + ``NAME-key.pem`` (keys mode 0600):
``coordinator``, ``node-<ID>``, ``user-<UID>-<GID>``, ``etcd``. Copy each machine only
its own pair and ``ca.pem``; keep ``ca-key.pem`` off the cluster.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vas.core import certs


def load_or_make_ca(directory: str, days: int) -> certs.Authority:
    cert_path = os.path.join(directory, "ca.pem")
    key_path = os.path.join(directory, "ca-key.pem")
    if not os.path.exists(cert_path):
        print(f"new CA {cert_path}")
        return certs.make_ca(directory, "vas CA", days)
    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        cert = x509.load_pem_x509_certificate(c.read())
        key = serialization.load_pem_private_key(k.read(), password=None)
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
        sys.exit(f"make-certs: the CA {cert_path} expired on {cert.not_valid_after_utc}")
    return certs.Authority(cert, key, cert_path)


def user_pair(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not sep or not uid.isdigit() or not gid.isdigit():
        raise argparse.ArgumentTypeError(f"invalid user {text!r}: expected UID:GID")
    return int(uid), int(gid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="directory of the CA and the certificates")
    parser.add_argument("--coordinator", action="store_true",
                        help="a coordinator certificate (vas://coordinator)")
    parser.add_argument("--node", action="append", default=[], metavar="ID",
                        help="an agent certificate for node ID (vas://node/ID; the agent's "
                             "--id); repeatable")
    parser.add_argument("--user", action="append", default=[], type=user_pair,
                        metavar="UID:GID", help="a client certificate acting as UID:GID "
                                                "(vas://user/UID/GID; 0:0 = root); repeatable")
    parser.add_argument("--etcd", action="append", default=[], metavar="HOST",
                        help="a name or IP address etcd is dialled by: makes etcd.pem "
                             "(server and client); repeatable")
    parser.add_argument("--days", type=int, default=certs.DEFAULT_DAYS,
                        help=f"validity of the certificates (default {certs.DEFAULT_DAYS})")
    args = parser.parse_args()
    if not (args.coordinator or args.node or args.user or args.etcd):
        parser.error("name at least one holder: --coordinator, --node, --user or --etcd")

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    ca = load_or_make_ca(args.dir, certs.DEFAULT_CA_DAYS)
    wanted = [("coordinator", certs.coordinator_identity())] if args.coordinator else []
    wanted += [(f"node-{node}", certs.node_identity(node)) for node in args.node]
    wanted += [(f"user-{uid}-{gid}", certs.user_identity(uid, gid)) for uid, gid in args.user]
    if args.etcd:
        names = tuple(h for h in args.etcd if not _is_ip(h))
        ips = tuple(h for h in args.etcd if _is_ip(h))
        wanted.append(("etcd", certs.Identity("etcd", None, names, ips, server=True)))
    for stem, identity in wanted:
        cert, key = certs.issue(ca, args.dir, stem, identity, args.days)
        print(f"{identity.uri or 'etcd'}: {cert} {key}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
