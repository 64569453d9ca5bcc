"""The ``key=value`` settings every benchmark script takes: typed like their defaults, unknown keys refused.

args = parse_settings(sys.argv[1:], {"orgs": 100, "out": ""})   # orgs=10 out=/tmp/x -> {"orgs": 10, ...}
"""

from __future__ import annotations


def parse_settings(argv: list[str], defaults: dict, numbers: tuple[str, ...] = ()) -> dict:
    """``defaults`` updated from ``key=value`` items: int/float defaults (and ``numbers``) parsed as numbers."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"unknown setting {key!r}; known: {', '.join(defaults)}")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                args[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(default, int) and key not in numbers:
                args[key] = int(value)
            elif isinstance(default, float) or key in numbers:
                args[key] = float(value) if value.lower() not in ("none", "") else None
            else:
                args[key] = value
        except ValueError:
            raise SystemExit(f"{key}={value}: expected a number") from None
    return args
