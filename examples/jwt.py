#!/usr/bin/env python3
"""Signs an HS256 JWT, standing in for the identity provider or dashboard of an example
(the one that shares its secret with keygate's `jwt.issuers[].secret_env`).

    python3 examples/jwt.py --secret-env CALLABA_JWT_SECRET --iss https://dashboard.callaba.example/ \\
        --aud callaba-engine --sub instance-1 --tenant 6f1c... [--scope "a:b c:d"] [--ttl 30m] [--jti id] \\
        [--claim role=operator ...]

Prints the token. `--ttl` is the life from now (`90s`, `30m`, `12h`); a negative one
(`--ttl=-1m`) makes a token that has already expired. Standard library only.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def seconds(text: str) -> int:
    m = re.fullmatch(r"(-?\d+)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 12h)")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def sign(secret: str, claims: dict) -> str:
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--secret-env", required=True, help="the variable holding the shared secret")
    p.add_argument("--iss", required=True)
    p.add_argument("--aud", required=True)
    p.add_argument("--sub", required=True)
    p.add_argument("--tenant", required=True, help="the tenant_id claim")
    p.add_argument("--scope", default="", help="space-separated scopes")
    p.add_argument("--ttl", type=seconds, default=seconds("30m"))
    p.add_argument("--jti")
    p.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE", help="another string claim")
    args = p.parse_args()
    secret = os.environ.get(args.secret_env)
    if not secret:
        sys.exit(f"{args.secret_env} is not set")
    now = int(time.time())
    claims = {
        "iss": args.iss,
        "aud": args.aud,
        "sub": args.sub,
        "tenant_id": args.tenant,
        "iat": now if args.ttl > 0 else now + args.ttl - 60,
        "exp": now + args.ttl,
    }
    if args.scope:
        claims["scope"] = args.scope
    if args.jti:
        claims["jti"] = args.jti
    for extra in args.claim:
        name, sep, value = extra.partition("=")
        if not sep:
            sys.exit(f"--claim {extra!r}: expected NAME=VALUE")
        claims[name] = value
    print(sign(secret, claims))


if __name__ == "__main__":
    main()
