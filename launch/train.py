"""Entry script for `fabric run` (and torchrun, srun): `fabric run [--devices 8 ...] launch/train.py [app options]`.

Why this file exists:
1. `fabric run` needs a script path. `fabric run pretrain/__main__.py` would put `pretrain/` first on
   sys.path, where its modules (config, signals, strategy, metrics, ...) shadow any top-level module of
   the same name. This folder holds no importable modules.
2. `fabric run` hands its settings to the script as LT_* environment variables (LT_DEVICES,
   LT_NUM_NODES, LT_ACCELERATOR, LT_PRECISION, LT_STRATEGY, LT_CLI_USED=1) that `Fabric(...)` reads and
   checks against its own arguments. The app takes its settings from its typed config instead
   (`--system.devices`, ...) and builds `Fabric(devices=<config>, strategy=FSDPStrategy(...))`, which with
   LT_CLI_USED set raises "conflicts with the value set through the CLI" and then refuses
   `fabric.launch()` ("processes have already been created"). So this script turns the LT_* values
   into the equivalent config options (an explicit, different app option is an error), removes the
   LT_* variables, and runs the app as the torchrun-launched process it is: Fabric detects torchrun
   (TorchElasticEnvironment) and `fabric.launch()` only sets up the process group.
"""
from __future__ import annotations

import os
import sys

# LT_* variable -> (app option, value translation)
_PRECISION = {"bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "bf16-true": "bf16-true", "32": "32-true",
              "32-true": "32-true"}
_STRATEGY = {"auto": "auto", "fsdp": "fsdp", "ddp": "ddp"}


class LaunchError(ValueError):
    pass


def _devices(value: str, environ) -> str:
    # torchrun knows how many processes it started on this node; prefer that over "auto" or a list.
    local = environ.get("LOCAL_WORLD_SIZE")
    if local:
        return local
    if value.isdigit():
        return value
    raise LaunchError(f"fabric run --devices {value!r}: use a number of devices per node")


def _table(name: str, mapping: dict[str, str]):
    def convert(value: str, environ) -> str:
        if value not in mapping:
            raise LaunchError(f"fabric run --{name} {value}: the app supports {', '.join(sorted(mapping))}; or leave "
                              f"it out and set --system.{name} in the app options")
        return mapping[value]
    return convert


_OPTIONS = {
    "LT_ACCELERATOR": ("--system.accelerator", lambda v, e: v),
    "LT_DEVICES": ("--system.devices", _devices),
    "LT_NUM_NODES": ("--system.num_nodes", lambda v, e: v),
    "LT_PRECISION": ("--system.precision", _table("precision", _PRECISION)),
    "LT_STRATEGY": ("--system.strategy", _table("strategy", _STRATEGY)),
}


def translate(argv: list[str], environ) -> list[str]:
    """App arguments with the `fabric run` settings added; removes the LT_* variables from `environ`."""
    given: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--system."):
            key, eq, value = arg.partition("=")
            given[key] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    extra: list[str] = []
    for var, (option, convert) in _OPTIONS.items():
        raw = environ.pop(var, None)
        if raw is None:
            continue
        value = convert(raw, environ)
        if option in given:
            if given[option] != value:
                raise LaunchError(f"fabric run sets {option.removeprefix('--')}={value} but the app options say "
                                  f"{option} {given[option]}; give it in one place")
            continue
        extra += [option, value]
    environ.pop("LT_CLI_USED", None)
    return list(argv) + extra


def main() -> int:
    try:
        argv = translate(sys.argv[1:], os.environ)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pretrain.__main__ import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    sys.exit(main())
