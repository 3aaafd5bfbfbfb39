#!/usr/bin/env bash
# GPU benchmark in one script: train.py images/s per model x size x precision/layout/compile,
# time to a target accuracy on CIFAR-10-sized data, TTA and soup throughput; one markdown table.
#
#   bash benchmarks/bench_gpu.sh [--device cuda] [--out bench_gpu.md] [--cifar DIR]
#        [--models "smallnet_s resnet18 resnet50"] [--sizes "32 224"]
#        [--variants "fp32 bf16 channels-last compile"] [--images 5120] [--batch-size 256]
#        [--target 0.94] [--epochs 30] [--work DIR] [--threads N] [--tiny]
#
# images/s: train.py --epochs 2 on --images synthetic 32x32 RGB images (resized to each --sizes
#   on load), the last epoch's own images/s (the first builds kernels / compiles). Variants are
#   cumulative: fp32 (--amp none --no-channels-last), bf16 (--amp bf16), channels-last (bf16 +
#   --channels-last), compile (bf16 + channels-last + --compile).
# time to target: train.py with its default recipe (--device and --epochs given) on --cifar DIR
#   (any local CIFAR-10 folder data.py reads: train/<class>/*.png + test/; nothing is downloaded)
#   or, without it, a synthetic CIFAR-10-sized set (50,000 + 10,000 32x32 RGB images, 10 classes);
#   the training seconds until validation accuracy first reaches --target, and the test accuracy.
# TTA: benchmarks/bench_tta.py (infer.py's stacked-view forward vs a loop vs one big forward).
# soup: benchmarks/bench_soup.py (soup.py --eval-individual --greedy vs bare forward passes).
# --tiny: tiny sizes for a CPU smoke test (tests/test_benchmarks.py runs it with --device cpu).
set -euo pipefail

prog=bench_gpu.sh
die() { echo "$prog: error: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
DEVICE=cuda OUT=bench_gpu.md CIFAR="" WORK="" THREADS="" TINY=0
MODELS="smallnet_s resnet18 resnet50" SIZES="32 224" VARIANTS="fp32 bf16 channels-last compile"
IMAGES=5120 BATCH=256 TARGET=0.94 EPOCHS=30
TTM_MODEL="" N_TRAIN=50000 N_TEST=10000 TTA_N=8192 SOUP_N=8 SOUP_VAL=0.05

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value; see the usage at the top of $0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) need "$@"; DEVICE="$2"; shift 2 ;;
    --out) need "$@"; OUT="$2"; shift 2 ;;
    --cifar) need "$@"; CIFAR="$2"; shift 2 ;;
    --work) need "$@"; WORK="$2"; shift 2 ;;
    --models) need "$@"; MODELS="$2"; shift 2 ;;
    --sizes) need "$@"; SIZES="$2"; shift 2 ;;
    --variants) need "$@"; VARIANTS="$2"; shift 2 ;;
    --images) need "$@"; IMAGES="$2"; shift 2 ;;
    --batch-size) need "$@"; BATCH="$2"; shift 2 ;;
    --target) need "$@"; TARGET="$2"; shift 2 ;;
    --epochs) need "$@"; EPOCHS="$2"; shift 2 ;;
    --ttm-model) need "$@"; TTM_MODEL="$2"; shift 2 ;;
    --threads) need "$@"; THREADS="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1'; see the usage at the top of $0 (--help)" ;;
  esac
done
if [[ $TINY == 1 ]]; then  # a smoke test: every stage runs, in seconds on a CPU
  N_TRAIN=240 N_TEST=60 TTA_N=128 SOUP_N=2 SOUP_VAL=0.003
  [[ $IMAGES == 5120 ]] && IMAGES=128
  [[ $BATCH == 256 ]] && BATCH=32
  [[ $EPOCHS == 30 ]] && EPOCHS=1
fi

# ---- validate everything before the first side effect
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 $2: expected a positive integer"; }
posint --images "$IMAGES"; posint --batch-size "$BATCH"; posint --epochs "$EPOCHS"
[[ -z "$THREADS" ]] || posint --threads "$THREADS"
for s in $SIZES; do posint --sizes "$s"; done
[[ -n "$MODELS" ]] || die "--models is empty; pass e.g. \"smallnet_s resnet18\""
for v in $VARIANTS; do
  case "$v" in fp32|bf16|channels-last|compile) ;; *)
    die "--variants: unknown '$v'; choose from fp32 bf16 channels-last compile" ;; esac
done
[[ "$TARGET" =~ ^0?\.[0-9]+$|^1(\.0*)?$ ]] || die "--target $TARGET: expected an accuracy in (0, 1]"
case "$DEVICE" in cpu|cuda|cuda:[0-9]*) ;; *) die "--device $DEVICE: expected cpu or cuda" ;; esac
command -v "$PY" >/dev/null || die "python interpreter '$PY' not found; activate the venv or set PYTHON"
if [[ $DEVICE == cuda* ]]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "--device $DEVICE: no CUDA device here; pass --device cpu (with --tiny for a smoke test)"
fi
if [[ -n "$CIFAR" ]]; then
  [[ -d "$CIFAR" ]] || die "--cifar $CIFAR: no such folder; pass a local CIFAR-10 folder (train/<class>/ + test/)"
fi
[[ -d "$OUT" ]] && die "--out $OUT: is a directory; pass a file name such as bench_gpu.md"
OUT_DIR="$(dirname -- "$OUT")"
[[ -d "$OUT_DIR" && -w "$OUT_DIR" ]] || die "--out $OUT: folder $OUT_DIR does not exist or is not writable"
if [[ -n "$WORK" && -e "$WORK" && -n "$(ls -A "$WORK" 2>/dev/null)" ]]; then
  die "--work $WORK: exists and is not empty; pass a new folder"
fi

# ---- work dir (removed at the end unless --work was given)
if [[ -z "$WORK" ]]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench_gpu.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK"
export IMGCLS_CACHE="$WORK/cache"
THR=(); [[ -n "$THREADS" ]] && THR=(--threads "$THREADS")
ROWS="$WORK/rows.md"; : > "$ROWS"

# A learnable synthetic CIFAR-10-sized set in the folder layout data.py reads: each class is a
# fixed random low-frequency colour template; images are shifted, noisy, contrast-jittered copies.
make_synth() {  # make_synth DIR N_TRAIN N_TEST
  "$PY" - "$@" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, n_train, n_test = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
coarse = rng.uniform(0, 1, (10, 4, 4, 3))
templates = np.stack([np.kron(c, np.ones((8, 8, 1))) for c in coarse])  # 10 x 32 x 32 x 3
for part, n in (("train", n_train), ("test", n_test)):
    y = np.arange(n) % 10
    for c in range(10):
        (root / part / str(c)).mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(y):
        t = np.roll(templates[c], tuple(rng.integers(-3, 4, 2)), (0, 1))
        x = 0.5 + rng.uniform(0.4, 1.0) * (t - 0.5) + rng.normal(0, 0.25, t.shape)
        img = (np.clip(x, 0, 1) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / part / str(c) / f"{part}_{i:05d}.png")
PY
}

last_metric() {  # last_metric RUN_DIR KEY -> the value of KEY in metrics.jsonl's last row
  "$PY" -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]+"/metrics.jsonl")]; print(r[-1][sys.argv[2]])' "$1" "$2"
}

variant_flags() {
  case "$1" in
    fp32) echo "--amp none --no-channels-last" ;;
    bf16) echo "--amp bf16 --no-channels-last" ;;
    channels-last) echo "--amp bf16 --channels-last" ;;
    compile) echo "--amp bf16 --channels-last --compile" ;;
  esac
}

echo "$prog: device $DEVICE, work dir $WORK" >&2
"$PY" -c 'import torch; print("torch", torch.__version__, "| cuda:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' > "$WORK/env.txt"

# ---- 1. images/s of train.py
make_synth "$WORK/speed" "$IMAGES" 20
echo "| model | px | variant | batch | train images/s |" >> "$ROWS"
echo "| --- | --- | --- | --- | --- |" >> "$ROWS"
for m in $MODELS; do
  for s in $SIZES; do
    for v in $VARIANTS; do
      name="ips_${m}_${s}_${v}"
      # shellcheck disable=SC2046
      if "$PY" "$ROOT/train.py" --data "$WORK/speed" --img-size "$s" --model "$m" --epochs 2 \
          --batch-size "$BATCH" --warmup-epochs 0 --lr 0.05 --val-ratio 0.05 --device "$DEVICE" \
          $(variant_flags "$v") "${THR[@]}" --out "$WORK/runs" --name "$name" --quiet \
          > "$WORK/$name.log" 2>&1; then
        ips="$(last_metric "$WORK/runs/$name" images_per_s)"
      else
        ips="failed: $(tail -n 1 "$WORK/$name.log" | cut -c1-120)"
      fi
      echo "| $m | $s | $v | $BATCH | $ips |" >> "$ROWS"
      echo "$prog: $m ${s}px $v: $ips images/s" >&2
    done
  done
done

# ---- 2. time to --target on CIFAR-10-sized data
if [[ -n "$CIFAR" ]]; then DATA="$CIFAR" DATA_NAME="$CIFAR"
else
  make_synth "$WORK/cifar" "$N_TRAIN" "$N_TEST"
  DATA="$WORK/cifar" DATA_NAME="synthetic CIFAR-10-sized ($N_TRAIN + $N_TEST images 32x32x3)"
fi
MODEL_FLAG=(); [[ -n "$TTM_MODEL" ]] && MODEL_FLAG=(--model "$TTM_MODEL")
t0=$(date +%s.%N)
"$PY" "$ROOT/train.py" --data "$DATA" --epochs "$EPOCHS" --device "$DEVICE" --eval-test \
  "${MODEL_FLAG[@]}" "${THR[@]}" --out "$WORK/runs" --name ttm --quiet > "$WORK/ttm.log" 2>&1 \
  || die "time-to-accuracy run failed: $(tail -n 1 "$WORK/ttm.log")"
t1=$(date +%s.%N)
TTM="$("$PY" - "$WORK/runs/ttm" "$TARGET" "$t0" "$t1" <<'PY'
import json, sys
run, target, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
summary = json.load(open(f"{run}/summary.json"))
args = json.load(open(f"{run}/args.json"))
seconds, reached = 0.0, None
for r in rows:
    seconds += r["seconds"]
    acc = max(r["val_acc"], r.get("ema_val_acc", 0))
    if reached is None and acc >= target:
        reached = (r["epoch"], seconds)
hit = f"epoch {reached[0]}, {reached[1]:.1f} s of training" if reached else "not reached"
best = max(max(r["val_acc"], r.get("ema_val_acc", 0)) for r in rows)
test = summary.get("ema_test_acc") or summary.get("test_acc")
test = f"{test:.4f}" if test is not None else "-"
print(f"| {args['model']} | {args['amp']} | {len(rows)} | {hit} | {best:.4f} | {test} | {t1 - t0:.0f} |")
PY
)"

# ---- 3. TTA and 4. soup throughput
TTA_SIZE=32; [[ $TINY == 1 ]] && TTA_SIZE=16
"$PY" "$ROOT/benchmarks/bench_tta.py" --device "$DEVICE" --model smallnet_s --n "$TTA_N" \
  --size "$TTA_SIZE" --tta rot90 --amp "$([[ $DEVICE == cpu ]] && echo none || echo bf16)" \
  --repeats 2 "${THR[@]}" > "$WORK/tta.txt" 2>&1 || die "bench_tta.py failed: $(tail -n 1 "$WORK/tta.txt")"
"$PY" "$ROOT/benchmarks/bench_soup.py" --device "$DEVICE" --n "$SOUP_N" --val-ratio "$SOUP_VAL" \
  "${THR[@]}" > "$WORK/soup.txt" 2>&1 || die "bench_soup.py failed: $(tail -n 1 "$WORK/soup.txt")"

# ---- the report, written atomically
{
  echo "## bench_gpu.sh: $(date -u '+%Y-%m-%d %H:%M') UTC, device $DEVICE ($(cat "$WORK/env.txt"))"
  echo
  echo "### train.py images/s (--images $IMAGES synthetic images, 2nd epoch)"
  echo
  cat "$ROWS"
  echo
  echo "### time to $TARGET validation accuracy: $DATA_NAME, train.py defaults, --epochs $EPOCHS"
  echo
  echo "| model | amp | epochs | reached $TARGET | best val acc | test acc | wall s |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
  echo "$TTM"
  echo
  echo "### TTA (benchmarks/bench_tta.py)"
  echo
  echo '```'; cat "$WORK/tta.txt"; echo '```'
  echo
  echo "### soup (benchmarks/bench_soup.py --n $SOUP_N)"
  echo
  echo '```'; cat "$WORK/soup.txt"; echo '```'
} > "$OUT.tmp.$$"
mv -f "$OUT.tmp.$$" "$OUT"
cat "$OUT"
echo "$prog: wrote $OUT" >&2
