"""YAML that can neither run code nor explode: `yaml.safe_load` with aliases refused.

Why: `yaml.safe_load` already refuses the tags that build Python objects (`!!python/object/apply:os.system`),
but an anchor/alias "billion laughs" document of a few hundred bytes becomes gigabytes as soon as something
walks it as a tree (json.dumps, jsonargparse, a deep copy). Nothing this app reads (its configs, the YAML
files of a checkpoint) needs aliases, so `load` refuses every `*alias` (and so the `<<: *alias` merge key)
with a `yaml.YAMLError` that says where it is; anchors alone are harmless and accepted.

    from amp_common import yaml_safe
    data = yaml_safe.load(path.read_text())   # raises yaml.YAMLError (one line via str()) on bad YAML
"""
from __future__ import annotations

from typing import Any

import yaml


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
    return yaml.load(text, Loader=NoAliasSafeLoader)  # a SafeLoader subclass
