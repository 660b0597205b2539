#!/usr/bin/env python3
"""TCP forwarder from this network namespace into another one (stdlib only; used by scripts/slurm_local.sh).

    netns_forward.py --listen 127.0.0.1:6817 [--netns /run/netns/sayo-ctl] --connect 10.250.0.1:6817 --pidfile F

The listening socket is made in the namespace this process starts in (the host's, or a node's); then the
process enters `--netns` if given, so every connection it opens to `--connect` leaves from inside that
namespace. This is how Slurm clients on the host (sbatch, squeue, scontrol, scancel, sinfo) reach a slurmctld
that lives on a subnet which exists only inside the namespaces of the local multi-node cluster: the host gets
no address or route on it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=hostport, metavar="HOST:PORT",
                    help="address to accept connections on, bound in the namespace this process starts in "
                         "(e.g. 127.0.0.1:6817)")
    ap.add_argument("--netns", help="path of the namespace to connect from (/run/netns/NAME); default: this one")
    ap.add_argument("--connect", required=True, type=hostport, metavar="HOST:PORT",
                    help="address each accepted connection is forwarded to, reached from inside --netns "
                         "(e.g. slurmctld at 10.250.0.1:6817)")
    ap.add_argument("--pidfile", metavar="FILE",
                    help="write this process's pid to FILE once it listens (slurm_local.sh waits for it and "
                         "stops the forwarder by it)")
    args = ap.parse_args()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(args.listen)          # in the namespace we started in
    listener.listen(128)
    if args.netns:
        setns(args.netns)               # from here on, new sockets belong to the cluster's namespace
    if args.pidfile:
        with open(args.pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, args.connect), daemon=True).start()


if __name__ == "__main__":
    main()
