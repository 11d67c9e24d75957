"""``fastmsc info``: versions, devices and the backend each op uses per device, as text or JSON."""

from __future__ import annotations

import json

from ..info import format_info, info


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the info as JSON")


def run(args) -> int:
    if args.json:
        print(json.dumps(info(), indent=2))
    else:
        print(format_info())
    return 0
