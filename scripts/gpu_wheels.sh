#!/usr/bin/env bash
# Download the app's dependencies as wheels for a GPU machine without network: Linux x86_64, CPython 3.12, with
# torch >= 2.11 (CUDA) already installed. torch and everything torch itself requires are left out (that machine
# has them); every other package the app needs (pyproject.toml's dependencies and theirs, extras included) is
# pinned to the version installed in this machine's .venv (the versions the test suite ran with) and fetched as
# a cp312 manylinux wheel into .whl/ (ignored by git), with the list in .whl/requirements.txt.
#
#   bash scripts/gpu_wheels.sh [--dest DIR] [--python-version 3.12] [--gpu-check-only] [--dry-run]
#
# --dry-run prints the list and the pip command and downloads nothing. --gpu-check-only leaves out pyarrow and
# tensorboard and what only they need (46 packages, not 55; gpu_check imports neither), for a transfer limited
# below the whole set's size (45 MB, 12 s measured). Needs this machine's .venv (bash
# scripts/setup.sh) and PyPI. About 120 MB, 20 s (measured, all 55). Then carry the repository with .whl/ to the GPU
# machine and, from its root (benchmarks/README.md, benchmarks/gpu_check.py):
#   python -m pip install --no-index --no-deps --target /tmp/amp-deps .whl/*.whl && \
#       PYTHONPATH=/tmp/amp-deps:. python -m benchmarks.gpu_check --out-dir "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.whl
pyver=3.12
dry=0
only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dest) dest=${2:?--dest needs a folder}; shift 2 ;;
        --python-version) pyver=${2:?--python-version needs a value such as 3.12}; shift 2 ;;
        --dry-run) dry=1; shift ;;
        --gpu-check-only) only=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ ! -x .venv/bin/python ]; then
    echo "gpu_wheels.sh: no .venv here; run 'bash scripts/setup.sh' first (the wheels are pinned to its versions)" >&2
    exit 2
fi

# name==version of every package the app needs beyond torch, for the target Python on Linux x86_64
reqs=$(.venv/bin/python - "$pyver" "$only" <<'EOF'
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {"python_version": sys.argv[1], "python_full_version": sys.argv[1] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def closure(roots):
    """Every distribution the requirements `roots` pull in (extras followed), by canonical name."""
    seen, todo = {}, list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        for text in metadata.requires(name) or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in ["", *seen[name]]):
                todo.append(sub)
    return set(seen)


with open("pyproject.toml", "rb") as f:
    deps = [Requirement(d) for d in tomllib.load(f)["project"]["dependencies"]]
deps = [d for d in deps if d.marker is None or d.marker.evaluate({**env, "extra": ""})]
if sys.argv[2] == "1":  # --gpu-check-only: parquet reading and TensorBoard logging are not part of it
    deps = [d for d in deps if canonicalize_name(d.name) not in ("pyarrow", "tensorboard")]
torch_side = closure([Requirement("torch")])
for name in sorted(closure(deps) - torch_side):
    print(f"{name}=={metadata.version(name)}")
EOF
)
count=$(printf '%s\n' "$reqs" | wc -l)
cmd=(.venv/bin/python -m pip download --no-deps --only-binary=:all: --dest "$dest"
     --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform manylinux1_x86_64 --platform linux_x86_64 --platform any)
if [ "$dry" = 1 ]; then
    printf '%s\n' "$reqs"
    echo "# $count packages (not torch or what torch requires); would run: ${cmd[*]} -r $dest/requirements.txt"
    exit 0
fi
mkdir -p "$dest"
printf '%s\n' "$reqs" > "$dest/requirements.txt"
"${cmd[@]}" -r "$dest/requirements.txt"
echo "gpu_wheels.sh: $count packages in $dest ($(du -sh "$dest" | cut -f1)); on the GPU machine, from the repository root:"
echo "  python -m pip install --no-index --no-deps --target /tmp/amp-deps $dest/*.whl && \\"
echo "      PYTHONPATH=/tmp/amp-deps:. python -m benchmarks.gpu_check --out-dir \"\$OUT\""
