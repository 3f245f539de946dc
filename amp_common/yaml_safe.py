"""YAML that can neither run code nor explode: `yaml.safe_load` with aliases refused.

Why: `yaml.safe_load` already refuses the tags that build Python objects (`!!python/object/apply:os.system`),
but an anchor/alias "billion laughs" document of a few hundred bytes becomes gigabytes as soon as something
walks it as a tree (json.dumps, jsonargparse, a deep copy). Nothing this app reads (its configs, the YAML
files of a checkpoint) needs aliases, so `load` refuses every `*alias` (and so the `<<: *alias` merge key)
with a `yaml.YAMLError` that says where it is; anchors alone are harmless and accepted.

    from amp_common import yaml_safe
    data = yaml_safe.load(path.read_text())   # raises yaml.YAMLError (one line via str()) on bad YAML

`check(text)` refuses the same without building anything (and nesting deeper than MAX_DEPTH, where PyYAML's
recursive composer would end in a RecursionError): for text that another loader reads later, e.g. every
command-line value, which jsonargparse parses as YAML with its own loader.
"""
from __future__ import annotations

from typing import Any

import yaml

MAX_DEPTH = 100  # nested collections; a config has 3


class NoAliasSafeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that raises a ComposerError at the first alias."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not accepted",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load(text: str) -> Any:
    """The plain data (dicts, lists, strings, numbers, booleans, None, dates) of one YAML document."""
    check(text)
    return yaml.load(text, Loader=NoAliasSafeLoader)  # a SafeLoader subclass


def check(text: str) -> None:
    """Raise yaml.YAMLError at the first alias, or past MAX_DEPTH nested collections, from the parser's events
    (which expand nothing). Text that is not valid YAML up to there passes: its loader reports it."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not accepted",
                                                  event.start_mark)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"YAML nested deeper than {MAX_DEPTH} levels",
                                                      event.start_mark)
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.composer.ComposerError:
        raise
    except yaml.YAMLError:
        return
