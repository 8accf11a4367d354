#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for `python bench/gpu_check.py` there (its call carries
# bench/gpu_wheels: carry: ["bench/gpu_wheels"]). Run here, where the package registry is reachable:
#
#   bash bench/gpu_wheels.sh                        # PYTHON=... picks the pip (default: .venv's)
#   bash bench/gpu_wheels.sh --with-bitsandbytes    # also bitsandbytes (42 MiB): the QLoRA part runs there
#
# The machine (Python 3.12, x86-64, nothing can be fetched there) has torch, transformers, peft,
# accelerate, tokenizers, safetensors, pyyaml, numpy, pandas, pyarrow, xxhash, fsspec, requests, httpx,
# tqdm, huggingface_hub, packaging, filelock, jinja2 and psutil: everything datasets, trl and sftrainer
# need (their Requires-Dist) except datasets itself, its dill and multiprocess, and trl. Those are pinned
# to what the CPU suite runs with. datasets 5.2 wants pyarrow >= 24; datasets 4.8.5 (pyarrow >= 21) goes
# into fallback/, which gpu_check.py installs if datasets 5.2 does not work with the machine's pyarrow.
# bitsandbytes is not carried unless asked (its size is printed): without it the QLoRA part skips there,
# saying so. (bitsandbytes 0.50.2 for x86-64 is 42 MiB: with it the folder is about 45 MiB.)
# Fails if the folder is over 60 MiB (a call carries 64 MiB in all, the repository's files included).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BNB=0
[ "${1:-}" = --with-bitsandbytes ] && WITH_BNB=1
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
OUT=bench/gpu_wheels
LIMIT_MIB=60
TARGET=(--only-binary :all: --python-version 3.12 --implementation cp --no-deps
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_28_x86_64)

rm -rf "$OUT"
mkdir -p "$OUT/fallback"
"$PY" -m pip download -q "${TARGET[@]}" -d "$OUT" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0
"$PY" -m pip download -q "${TARGET[@]}" -d "$OUT/fallback" datasets==4.8.5
# The project itself (gpu_check.py runs the tree that travels, ahead of this wheel; the wheel shows it installs).
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .

bnb="$(mktemp -d)"
trap 'rm -rf "$bnb"' EXIT
"$PY" -m pip download -q "${TARGET[@]}" -d "$bnb" bitsandbytes
bnb_wheel="$(ls "$bnb")"
bnb_mib="$(du -sm "$bnb" | cut -f1)"
bnb_note="not carried (bash bench/gpu_wheels.sh --with-bitsandbytes carries it)"
if [ "$WITH_BNB" = 1 ]; then
  mv "$bnb/$bnb_wheel" "$OUT/"
  bnb_note="carried"
fi

{
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- sftrainer 2>/dev/null || echo ' (sftrainer/ modified)')"
  for f in "$OUT"/*.whl "$OUT"/fallback/*.whl; do echo "$(du -k "$f" | cut -f1) KiB  ${f#"$OUT"/}"; done | grep -v " bitsandbytes-"
  echo "bitsandbytes: ${bnb_wheel}, ${bnb_mib} MiB, ${bnb_note}"
} >"$OUT/MANIFEST.txt"
cat "$OUT/MANIFEST.txt"

bytes="$(du -sb "$OUT" | cut -f1)"
echo "total: $((bytes / 1024)) KiB in $OUT (limit ${LIMIT_MIB} MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "too large to carry: over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
