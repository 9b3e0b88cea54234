"""`saferl config show -c FILE [KEY=VALUE ...]`: the resolved config, one key a line, with each value's source.

Owns provenance: a key's source is the last of the file and the command line whose raw mapping names it
(or sets an optional section above it to null), else the schema's default. A section given as a mapping
(`eval.judge: {model: x}`) sets only the keys it names; the rest of it shows `default`. An optional section
that is off prints as one `section: null` line. The config is validated first, exactly as `saferl train`
would load it, so what is shown is what a run would get.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from saferl.cli.args import config_args, overrides

SOURCE_NAMES = {"the command line": "override"}  # a file's source is its path: shown as `file`


def source_of(key: str, sources: list[tuple[str, dict[str, Any]]]) -> str:
    """`default`, `file` or `override`: the last raw mapping (in merge order) that sets `key` or nulls a section
    above it."""
    found = "default"
    for name, raw in sources:
        node: Any = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
            if node is None:  # this or a section above it set to null
                found = SOURCE_NAMES.get(name, "file")
                break
        else:
            found = SOURCE_NAMES.get(name, "file")
    return found


def value_text(value: Any) -> str:
    """A value as YAML would read it back: plain strings bare, everything else (and ambiguous strings) JSON."""
    import yaml

    if isinstance(value, str) and value and yaml.safe_load(value) == value and ": " not in value:
        return value
    return json.dumps(value, default=str)


def resolved_lines(path: str | None, overrides: list[str]) -> list[str]:
    """`key: value  # source` for every key of the resolved config, in schema order."""
    from saferl.config import LEAF_KEYS, OPTIONAL_SECTION_KEYS, dotted_value, load_config, read_sources

    cfg = load_config(path, overrides)
    sources = read_sources(path, overrides)
    rows = []
    for key in LEAF_KEYS:
        value = dotted_value(cfg, key)
        off = any(key.startswith(s + ".") and dotted_value(cfg, s) is None for s in OPTIONAL_SECTION_KEYS)
        if off or (key in OPTIONAL_SECTION_KEYS and value is not None):
            continue  # inside a section that is off, or a section that is on (its keys are shown)
        rows.append((f"{key}: {value_text(value)}", source_of(key, sources)))
    width = min(60, max(len(text) for text, _ in rows))  # a long list does not push every comment right
    return [f"{text:<{width}}  # {source}" for text, source in rows]


def _cmd_config(args: argparse.Namespace) -> int:
    keys = overrides(args)
    what = [f"{args.config} (file)"] if args.config else []
    what += [f"{len(keys)} override(s)"] if keys else []
    print("# resolved config: schema defaults" + "".join(f" <- {w}" for w in what))
    print("\n".join(resolved_lines(args.config, keys)))
    return 0


def add_config_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="show the resolved config and where each value comes from")
    show = p.add_subparsers(dest="action", required=True).add_parser(
        "show", help="print the resolved config with each value's source",
        description="Print every config key of a run as `saferl train` would resolve it (schema defaults <- "
        "FILE <- KEY=VALUE overrides, validated), each with its source: default, file or override.")
    config_args(show)
    show.set_defaults(func=_cmd_config)
