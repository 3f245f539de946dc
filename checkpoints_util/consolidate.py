"""`amp-ckpt consolidate CKPT --out FILE`: a sharded (or plain) checkpoint -> one file of full weights.

Why: an FSDP checkpoint is a torch.distributed.checkpoint folder of shards that only DCP can read; a
single `torch.save` file of full tensors by litgpt names is what every other tool (litgpt, a notebook,
`GPT.load_state_dict`) takes. The DCP folder is read in this one process (no process group, no GPU).

Output:
- default: a plain state dict `{litgpt name: tensor}` (like litgpt's `lit_model.pth`), so
  `GPT(config).load_state_dict(torch.load(FILE))` works;
- `--with-optimizer`: `{"model": state dict, "optimizer": {"kind", "format", "param_groups", "state":
  {parameter name: {key: tensor}}}, "model_config": {...}, "trainer": {...}}`.

Every file is first checked against the sha256 recorded at save time (a damaged byte would be NaN in the
output). Memory: the whole model is held once (e.g. 13B in fp32 = 52 GB). For Hugging Face / litgpt use prefer
`export`, which streams (HF) block by block.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from amp_common.tensors import DTYPES, nbytes
from checkpoints_util.output import atomic_file, check_destination, human_bytes, progress
from checkpoints_util.reader import open_checkpoint


def consolidate(checkpoint, out, with_optimizer: bool = False, dtype: torch.dtype | None = None,
                overwrite: bool = False, quiet: bool = True):
    """Write the consolidated file; returns its path. Verifies the checksums and validates everything before
    writing."""
    check_destination(out, overwrite)
    ck = open_checkpoint(checkpoint, verify=True)  # a damaged file must not become NaN in the output
    ck.validate()
    info = ck.tensor_info()
    total = sum(nbytes(shape, d) for shape, d in info.values())
    sd = {}
    with progress(total, f"read {ck.path.name}", quiet) as bar:
        for name, t in ck.iter_model_tensors(dtype):
            sd[name] = t.contiguous()
            bar.update(nbytes(*info[name]))
    obj = sd
    if with_optimizer:
        obj = {"model": sd, "optimizer": ck.load_optimizer_by_name(),
               "model_config": dataclasses.asdict(ck.model_config), "trainer": ck.trainer}
    with atomic_file(out, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    if not quiet:
        from pathlib import Path

        print(f"wrote {out} ({human_bytes(Path(out).stat().st_size)}; {len(sd)} tensors"
              f"{', with optimizer state' if with_optimizer else ''}) from {ck.path}", file=sys.stderr)
    return out


def run(args) -> int:
    consolidate(args.checkpoint, args.out, with_optimizer=args.with_optimizer, dtype=DTYPES[args.dtype],
                overwrite=args.overwrite, quiet=args.quiet)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("consolidate", help="sharded or plain checkpoint -> one torch.save file of full weights",
                       description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CKPT", help="a step-XXXXXXXX folder, or a run folder (its newest checkpoint)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (e.g. model.pth)")
    p.add_argument("--with-optimizer", action="store_true",
                   help="also store the optimizer state by parameter name (the file becomes {'model', 'optimizer', "
                        "...})")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="cast floating tensors (auto = as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)

