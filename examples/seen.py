#!/usr/bin/env python3
"""Reads examples/upstream.py's JSON echo on stdin and prints what the upstream received
of the named request headers: one `name: value` line per value, `name: -` if it did not
arrive. Anything else on stdin (a denial, an error page) is printed as it is.

    curl -s localhost:10000/v1/contacts/1 -H "authorization: Bearer $TOKEN" \\
        | python3 examples/seen.py x-tenant-id x-keygate-scopes authorization
"""

import json
import sys


def main():
    text = sys.stdin.read()
    try:
        echo = json.loads(text)
        headers = echo["headers"]
    except (ValueError, KeyError, TypeError):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 1
    for name in sys.argv[1:]:
        values = [v for k, v in headers if k == name.lower()]
        for v in values or ["-"]:
            print(f"{name.lower()}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
