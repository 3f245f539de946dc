"""`amp-ckpt export CKPT --format litgpt|hf --out DIR`: weights for inference and fine-tuning tools.

- `--format litgpt`: `DIR/lit_model.pth` (a plain state dict by litgpt names) + `DIR/model_config.yaml`
  (litgpt's format), loadable with `GPT(Config.from_file(DIR/"model_config.yaml")).load_state_dict(...)`
  and by `litgpt generate/finetune --checkpoint_dir DIR` (with `--tokenizer`, below).
- `--format hf`: `DIR/config.json` (LlamaForCausalLM) + `DIR/model.safetensors`, or, above
  `--max-shard-size`, `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`; loadable with
  `transformers.LlamaForCausalLM.from_pretrained(DIR)`. Written block by block: peak memory is about
  one shard, so a 13B model exports on a login node.

`--tokenizer PATH|auto` adds the tokenizer, a SentencePiece `tokenizer.model` or a Hugging Face `tokenizer.json`
(checked against the one the training data was prepared with, see checkpoints_util/tokenizer_files.py).

Both first verify every file of the checkpoint against the sha256 recorded at save time (a damaged byte would
otherwise be NaN in the weights) and validate it against its model config, then write DIR atomically (a
temporary folder renamed at the end), so a failure leaves no half-written export behind.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

from amp_common.tensors import DTYPES, nbytes
from checkpoints_util import hf_llama, tokenizer_files
from checkpoints_util.output import atomic_dir, check_destination, human_bytes, parse_size, progress
from checkpoints_util.reader import Checkpoint, open_checkpoint

DEFAULT_MAX_SHARD = "5GB"


def _out_dtype(ck: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return ck.tensor_info()["transformer.wte.weight"][1]


def _total_bytes(ck: Checkpoint, dtype: torch.dtype) -> int:
    return sum(nbytes(shape, dtype) for shape, _ in ck.tensor_info().values())


def export_litgpt(checkpoint, out, dtype: torch.dtype | None = None, overwrite: bool = False,
                  quiet: bool = True, tokenizer: str | None = None) -> Path:
    check_destination(out, overwrite)
    ck = open_checkpoint(checkpoint, verify=True)  # a damaged file must not become NaN in the export
    ck.validate()
    tok = tokenizer_files.resolve_tokenizer(ck, tokenizer)
    dt = _out_dtype(ck, dtype)
    sd = {}
    with progress(_total_bytes(ck, dt), f"read {ck.path.name}", quiet) as bar:
        for name, t in ck.iter_model_tensors(dt):
            sd[name] = t.contiguous()
            bar.update(t.numel() * t.element_size())
    with atomic_dir(out, overwrite=overwrite) as tmp:
        torch.save(sd, tmp / "lit_model.pth")
        (tmp / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(ck.model_config), sort_keys=False))
        if tok is not None:
            tokenizer_files.write_tokenizer_files(tmp, tok, ck.model_config.block_size)
    _done(out, ck, quiet)
    return Path(out)


def export_hf(checkpoint, out, dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD,
              overwrite: bool = False, quiet: bool = True, tokenizer: str | None = None) -> Path:
    from safetensors.torch import save_file

    check_destination(out, overwrite)
    ck = open_checkpoint(checkpoint, verify=True)  # a damaged file must not become NaN in the export
    ck.validate()
    dt = _out_dtype(ck, dtype)
    config = hf_llama.hf_config(ck.model_config, dt)  # refuses non-Llama configs before writing
    tok = tokenizer_files.resolve_tokenizer(ck, tokenizer)
    if tok is not None:
        config.update(tokenizer_files.hf_token_ids(tok))
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    shards: list[list[str]] = []
    weight_bytes = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0

        def flush() -> None:
            save_file(current, str(tmp / f"part-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))

        with progress(_total_bytes(ck, dt), f"export {ck.path.name} -> hf", quiet) as bar:
            for name, t in ck.iter_model_tensors(dt):
                for hf_name, ht in hf_llama.to_hf(name, t, ck.model_config):
                    nbytes = ht.numel() * ht.element_size()
                    if current and current_bytes + nbytes > limit:
                        flush()
                        current, current_bytes = {}, 0
                    current[hf_name] = ht.contiguous()
                    current_bytes += nbytes
                    weight_bytes += nbytes
                bar.update(t.numel() * t.element_size())
            if current:
                flush()
        n = len(shards)
        if n == 1:
            (tmp / "part-00000.tmp").rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                (tmp / f"part-{i:05d}.tmp").rename(tmp / final)
                weight_map.update({nm: final for nm in names})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": weight_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tok is not None:
            tokenizer_files.write_tokenizer_files(tmp, tok, ck.model_config.block_size)
            (tmp / "generation_config.json").write_text(json.dumps(
                {**tokenizer_files.hf_token_ids(tok), "max_length": ck.model_config.block_size}, indent=2) + "\n")
    _done(out, ck, quiet)
    return Path(out)


def _done(out, ck: Checkpoint, quiet: bool) -> None:
    if quiet:
        return
    files = sorted(p for p in Path(out).iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {out} ({len(files)} files, {human_bytes(size)}) from {ck.path} "
          f"(step {ck.trainer.get('step')})", file=sys.stderr)


def run(args) -> int:
    dtype = DTYPES[args.dtype]
    if args.format == "litgpt":
        export_litgpt(args.checkpoint, args.out, dtype=dtype, overwrite=args.overwrite, quiet=args.quiet,
                      tokenizer=args.tokenizer)
    else:
        export_hf(args.checkpoint, args.out, dtype=dtype, max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, quiet=args.quiet, tokenizer=args.tokenizer)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write litgpt (lit_model.pth + model_config.yaml) or Hugging Face Llama "
                                      "(safetensors + config.json) weights", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CKPT", help="a step-XXXXXXXX folder, or a run folder (its newest checkpoint)")
    p.add_argument("--format", required=True, choices=["litgpt", "hf"], help="output format")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to create")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="cast the weights (auto = as stored; bfloat16 halves the size of an fp32 checkpoint)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD, metavar="SIZE",
                   help=f"hf only: largest safetensors file, e.g. 5GB, 500MB (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--tokenizer", metavar="PATH|auto", default=None,
                   help="also write tokenizer.model or tokenizer.json + tokenizer_config.json (and the bos/eos ids "
                        "for hf); auto = "
                        "the tokenizer recorded in the training data's manifest; a PATH is checked against it")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
