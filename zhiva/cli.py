"""
Admin commands beside the daemon:

``zhiva check-config [DIR]`` validates servers.json, models.json and the TLS
certificate without starting anything: every problem printed, exit 0 or 1.
The systemd unit and the Docker image run it before start.

``zhiva healthcheck [URL]`` exits 0 when the proxy's ``/healthz`` answers 200:
the Docker ``HEALTHCHECK`` (the image has no curl).
"""
from __future__ import annotations

import argparse
import ssl
import sys
import urllib.request
from pathlib import Path

from zhiva import config as configuration
from zhiva.tls import ServerTLS


def check_config(directory: Path, cert: Path, key: Path) -> list[str]:
    problems: list[str] = []
    try:
        loaded = configuration.load(directory)
    except configuration.ConfigError as e:
        problems += [f"config error: {p}" for p in e.problems]
    else:
        for warning in loaded.warnings:
            print(f"warning: {warning}")
    try:
        ServerTLS(cert, key)
    except ValueError as e:
        problems.append(str(e))
    return problems


def healthcheck(url: str) -> int:
    # Our own loopback listener with a self-signed certificate: nothing to verify.
    context = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as e:
        print(f"{url}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zhiva", description="zhiva model proxy tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate the config and certificate; exit 0 or 1")
    check.add_argument("directory", nargs="?", default=".", type=Path,
                       help="directory with servers.json and models.json (default: .)")
    check.add_argument("--cert", type=Path, default=Path("zhiva.crt"), help="TLS certificate (default: zhiva.crt)")
    check.add_argument("--key", type=Path, default=Path("zhiva.key"), help="TLS private key (default: zhiva.key)")
    health = commands.add_parser("healthcheck", help="exit 0 when /healthz answers 200")
    health.add_argument("url", nargs="?", default="https://127.0.0.1:8002/healthz")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck(args.url)
    problems = check_config(args.directory, args.cert, args.key)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"config in {args.directory.resolve()} and certificate {args.cert} are valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
