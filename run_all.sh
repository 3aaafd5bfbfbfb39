#!/usr/bin/env bash
# run_all.sh: the whole toolkit as one chain, offline, on synthetic letters (or your DATA).
#
#   synth letters -> RotNet pre-training -> per-block linear eval -> few labels: scratch vs
#   RotNet init -> supervised base -> fine-tuned ingredients -> uniform/greedy soups -> TTA ->
#   soft vote and Caruana selection -> submission.csv;  plus dirty-MNIST multi-label demo.
#
# Every stage writes into $RUNS_DIR/$RUN/ and is skipped when its output already exists, so
# running the same command again after an interruption (Ctrl-C, kill, reboot) continues where
# it stopped: an interrupted training resumes from its last.pt. Results: summary.md/.json.
# Settings are environment variables: `bash run_all.sh --help` lists them with their defaults.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FAST="${FAST:-0}"

# FAST=1: tiny everything (a smoke run of every stage, ~1 minute); otherwise the default run.
if [ "$FAST" = 1 ]; then
  # 2,000 letters x 4 epochs: the smallest base model that learns (~60% test, not chance)
  d_run=fast d_images=2000 d_test=200 d_img=20 d_epochs=4 d_rot_epochs=1 d_few_epochs=3
  d_lpc=5 d_n=2 d_linear_epochs=5 d_batch= d_dirty_images=300 d_dirty_test=100
  d_dirty_img=24 d_dirty_epochs=1 d_ft_epochs=1
else
  d_run=default d_images=10000 d_test=2000 d_img=28 d_epochs=5 d_rot_epochs=8 d_few_epochs=30
  d_lpc=10 d_n=4 d_linear_epochs=30 d_batch= d_dirty_images=20000 d_dirty_test=500
  d_dirty_img=41 d_dirty_epochs=4 d_ft_epochs=
fi

# the sizes the run may fit to this machine's speed (FIT=1): only those not given
given_images=${NUM_IMAGES:+1}
given_dirty=${DIRTY_IMAGES:+1}
PYTHON="${PYTHON:-python}"
RUNS_DIR="${RUNS_DIR:-runs}"
RUN="${RUN:-$d_run}"
DATA="${DATA:-}"
MODEL="${MODEL:-smallnet_s}"
NUM_IMAGES="${NUM_IMAGES:-$d_images}"
NUM_TEST="${NUM_TEST:-$d_test}"
IMG_SIZE="${IMG_SIZE:-$d_img}"
EPOCHS="${EPOCHS:-$d_epochs}"
ROT_EPOCHS="${ROT_EPOCHS:-$d_rot_epochs}"
LINEAR_EPOCHS="${LINEAR_EPOCHS:-$d_linear_epochs}"
LABELS_PER_CLASS="${LABELS_PER_CLASS:-$d_lpc}"
FEW_EPOCHS="${FEW_EPOCHS:-$d_few_epochs}"
N_INGREDIENTS="${N_INGREDIENTS:-$d_n}"
FT_EPOCHS="${FT_EPOCHS:-$d_ft_epochs}"
SEED="${SEED:-0}"
BATCH_SIZE="${BATCH_SIZE:-$d_batch}"
AUG="${AUG:-crop}"
TTA="${TTA:-shift}"
DEVICE="${DEVICE:-auto}"
AMP="${AMP:-auto}"
THREADS="${THREADS:-}"
DIRTY="${DIRTY:-1}"
DIRTY_IMAGES="${DIRTY_IMAGES:-$d_dirty_images}"
DIRTY_TEST="${DIRTY_TEST:-$d_dirty_test}"
DIRTY_IMG_SIZE="${DIRTY_IMG_SIZE:-$d_dirty_img}"
DIRTY_EPOCHS="${DIRTY_EPOCHS:-$d_dirty_epochs}"
FIT="${FIT:-1}"
FIT_SPEED="${FIT_SPEED:-}"

usage() {
  cat <<EOF
usage: [VAR=value ...] bash run_all.sh [--help | --plan]

Runs the whole chain; outputs go to \$RUNS_DIR/\$RUN/, results to summary.md and summary.json there.
--plan: only check the settings and print the sizes the run would use (FIT), writing nothing.
Running the same command again skips finished stages and resumes an interrupted training.

Settings are environment variables. Shown: the value this call would use; * = FAST=1 changes
the default.

EOF
  local var text row
  while IFS='|' read -r var text; do
    if [ -n "$var" ]; then printf -v row '  %-24s %s' "$var=${!var}" "$text"
    else printf -v row '  %-24s %s' "" "$text"; fi
    echo "$row"
  done <<'EOF'
FAST|1: a tiny smoke run of every stage (1-2 min on 2 CPU cores)
RUNS_DIR|root of all runs
RUN|* run name, outputs in $RUNS_DIR/$RUN (default "default", FAST=1 "fast")
DATA|single-label data set, any data.py format; empty: synth.py --mode letters
|  writes one to $RUNS_DIR/$RUN/data (with a labelled test part)
NUM_IMAGES|* synthetic letters: train images
NUM_TEST|* synthetic letters: labelled test images
IMG_SIZE|* synthetic letters: image side in pixels
MODEL|built-in smallnet, smallnet_s, smallnet_t, smallnet_l, or a timm name
EPOCHS|* supervised base model epochs
ROT_EPOCHS|* RotNet rotation pre-training epochs
LINEAR_EPOCHS|* linear-probe epochs per block
LABELS_PER_CLASS|* few-label comparison: labels per class
FEW_EPOCHS|* few-label comparison: epochs
N_INGREDIENTS|* soup ingredients: finetune.py --i 1..N
FT_EPOCHS|* ingredient epochs (empty: the grid point's own, 1..4)
SEED|--random-seed of every training (never changes the split)
BATCH_SIZE|training batch size (empty: train.py's recipe for the data size, >= 50 steps/epoch)
AUG|training augmentation (letters are not mirror-invariant: no flip)
TTA|TTA views for the greedy soup (infer.py --tta)
DEVICE|auto, cpu or cuda
AMP|auto, none, bf16 or fp16: --amp of every training (auto: bf16 where the CPU/GPU
|  supports it); soup.py/infer.py get it too when they accept the value
THREADS|CPU threads (empty: all cores)
DIRTY|1: also the dirty-MNIST multi-label demo
DIRTY_IMAGES|* dirty-MNIST train images (82x82 canvas, 1-2 letters each)
DIRTY_TEST|* dirty-MNIST labelled test images
DIRTY_IMG_SIZE|* dirty-MNIST decode size (the canvas is resized to it)
DIRTY_EPOCHS|* dirty-MNIST epochs
FIT|1: the default run (not FAST, synthetic letters) measures this machine's training speed
|  first (3 s) and, where it would take over 10 minutes, trains on fewer images (NUM_IMAGES,
|  DIRTY_IMAGES, unless given); 0: the sizes as they are
FIT_SPEED|images/s to assume instead of measuring (the same sizes on every machine)
PYTHON|interpreter
EOF
  cat <<'EOF'

examples:
  bash run_all.sh                       # the default run, into runs/default/
  FAST=1 bash run_all.sh                # smoke run, into runs/fast/
  DATA=../shared/data/fashion-mnist AUG=flip,crop TTA=flip RUN=fmnist DIRTY=0 bash run_all.sh
EOF
}

PLAN=0
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --plan) PLAN=1 ;;
  "") ;;
  *) echo "run_all.sh: error: unknown argument '$1'; settings are environment variables" \
       "(see bash run_all.sh --help)" >&2
     exit 2 ;;
esac

# --- 0. every setting checked before anything runs or is written: one line, exit 2 ----------
bad() {  # bad VAR WHAT FIX: the one error line
  echo "run_all.sh: error: $1='${!1}': $2; $3" >&2
  exit 2
}
whole() {  # whole VAR MIN [MAX] [optional]: a whole number in [MIN, MAX]; empty ok if optional
  local var=$1 lo=$2 hi=${3:-999999999} opt=${4:-} v=${!1}
  local fix="set $var to a whole number in [$lo, $hi] or unset it for the default"
  [ -z "$v" ] && [ -n "$opt" ] && return 0
  [[ "$v" =~ ^[0-9]{1,9}$ ]] || bad "$var" "not a whole number" "$fix"
  { [ "$((10#$v))" -ge "$lo" ] && [ "$((10#$v))" -le "$hi" ]; } || bad "$var" "out of range" "$fix"
}
one_of() {  # one_of VAR CHOICE...: the value is one of the choices
  local var=$1 c
  shift
  for c in "$@"; do [ "${!var}" = "$c" ] && return 0; done
  bad "$var" "not a valid value" "use one of: $*"
}
one_of FAST 0 1
one_of DIRTY 0 1
one_of FIT 0 1
one_of AMP auto none bf16 fp16
[[ "$DEVICE" =~ ^(auto|cpu|cuda|cuda:[0-9]+|mps)$ ]] ||
  bad DEVICE "not a device" "use auto, cpu, cuda, cuda:N or mps"
for var in NUM_IMAGES IMG_SIZE EPOCHS ROT_EPOCHS LINEAR_EPOCHS LABELS_PER_CLASS FEW_EPOCHS \
  N_INGREDIENTS DIRTY_IMAGES DIRTY_TEST DIRTY_IMG_SIZE DIRTY_EPOCHS; do
  whole "$var" 1
done
whole NUM_TEST 0
whole SEED 0 4294967295
whole FT_EPOCHS 1 999999999 optional
whole BATCH_SIZE 1 999999999 optional
whole THREADS 1 1024 optional
whole FIT_SPEED 1 999999999 optional
[[ "$RUN" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] ||
  bad RUN "not a plain name" "use letters, digits, '.', '_', '-' (outputs go to \$RUNS_DIR/\$RUN)"
[ -n "$RUNS_DIR" ] || bad RUNS_DIR "empty" "give a directory, e.g. RUNS_DIR=runs"
probe="$RUNS_DIR/$RUN"
while [ ! -e "$probe" ] && [ "$probe" != "$(dirname "$probe")" ]; do probe=$(dirname "$probe"); done
[ -d "$probe" ] || bad RUNS_DIR "$probe is not a directory" "choose another RUNS_DIR or RUN"
[ -w "$probe" ] || bad RUNS_DIR "$probe is not writable" "choose another RUNS_DIR"
[ -z "$DATA" ] || [ -e "$DATA" ] || bad DATA "no such file or directory" \
  "give an existing data set (any data.py format), or leave DATA empty for synthetic letters"
command -v "$PYTHON" >/dev/null || bad PYTHON "not an executable" "give a Python with the toolkit's requirements"
# Names only the toolkit knows (models, augmentations, TTA views, the fine-tuning grid), checked
# by its own tables; also whether soup.py/infer.py take --amp auto (then AMP=auto reaches them).
eval_amp=$("$PYTHON" - "$ROOT" "$MODEL" "$AUG" "$TTA" "$N_INGREDIENTS" "$AMP" <<'EOF'
import sys

sys.path.insert(0, sys.argv[1])
import data, finetune, infer, models, soup  # noqa: E402,F401

model, aug, tta, n, amp = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]


def bad(var, value, what, fix):
    print(f"run_all.sh: error: {var}='{value}': {what}; {fix}", file=sys.stderr)
    raise SystemExit(2)


for a in aug.split(","):
    if a.strip() not in data.AUGS:
        bad("AUG", aug, f"unknown augmentation '{a}'", f"use a comma list of {', '.join(data.AUGS)}")
for t in tta.split(","):
    if t.strip() not in ("none", *infer.TTA_NAMES):
        bad("TTA", tta, f"unknown view '{t}'", f"use a comma list of none, {', '.join(infer.TTA_NAMES)}")
if n > finetune.GRID_SIZE:
    bad("N_INGREDIENTS", n, "more than the fine-tuning grid has",
        f"use 1..{finetune.GRID_SIZE} (finetune.py --i)")  # fmt: skip
if model not in models.BUILTINS and not models._timm().is_model(model):
    bad("MODEL", model, "unknown model",
        f"use a built-in ({', '.join(models.BUILTINS)}) or a timm name")  # fmt: skip


def takes(parser, value):
    act = next(a for a in parser._actions if "--amp" in a.option_strings)
    return act.choices is None or value in act.choices


print("yes" if all(takes(m.build_parser(), amp) for m in (soup, infer)) else "no")
EOF
) || exit 2

R="$RUNS_DIR/$RUN"

# --- 0b. the default run sized to this machine (FIT=1) -------------------------------------
# The default sizes take REF_SECONDS on a machine where the probe below trains smallnet_s at
# REF_SPEED images/s (a 2-core Xeon with torch limited to AVX2, 2026-12-02; README "run_all.sh").
# Where this machine is slower, the training image counts not given shrink in proportion so
# that the run takes about FIT_SECONDS; FIXED_SECONDS of it (process starts, evaluation) do not
# shrink. The sizes are kept in $R/sizes.env, so a rerun (resume) uses the same ones.
REF_SPEED=650 REF_SECONDS=897 FIXED_SECONDS=150 FIT_SECONDS=540
fit_note=""
probed=0
if [ -f "$R/sizes.env" ]; then
  fit_images=$(sed -n 's/^NUM_IMAGES=\([0-9]*\)$/\1/p' "$R/sizes.env")
  fit_dirty=$(sed -n 's/^DIRTY_IMAGES=\([0-9]*\)$/\1/p' "$R/sizes.env")
  [ -z "$given_images" ] && [ -n "$fit_images" ] && NUM_IMAGES=$fit_images
  [ -z "$given_dirty" ] && [ -n "$fit_dirty" ] && DIRTY_IMAGES=$fit_dirty
  fit_note="the first run's sizes ($R/sizes.env): NUM_IMAGES=$NUM_IMAGES DIRTY_IMAGES=$DIRTY_IMAGES"
elif [ "$FIT" = 1 ] && [ "$FAST" = 0 ] && [ -z "$DATA" ] && [ "$REF_SPEED" != 0 ] &&
  { [ -z "$given_images" ] || [ -z "$given_dirty" ]; }; then
  speed=$FIT_SPEED
  [ -n "$speed" ] || speed=$("$PYTHON" - "$ROOT" "$MODEL" "$IMG_SIZE" "$AMP" "$DEVICE" "${THREADS:-0}" <<'EOF'
import sys
import time

sys.path.insert(0, sys.argv[1])
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402

arch, size, amp, device, threads = sys.argv[2], int(sys.argv[3]), *sys.argv[4:6], int(sys.argv[6])
if threads:
    torch.set_num_threads(threads)
dev = models.resolve_device(device)
amp = models.resolve_amp(dev, amp)
torch.manual_seed(0)
model = models.create_model(arch, 26, in_chans=1, img_size=size)
model = model.to(dev, memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(128, 1, size, size, device=dev).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 26, (128,), device=dev)


def step():
    with models.autocast(dev, amp):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


step(), step()  # kernels chosen and built
best = 0.0
for _ in range(3):  # the best of three windows: a moment of load elsewhere does not count
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.8:
        step()
        n += 1
    best = max(best, 128 * n / (time.perf_counter() - t0))
print(round(best))
EOF
) || exit 2
  read -r NUM_IMAGES DIRTY_IMAGES fit_note < <(awk -v p="$speed" -v rp="$REF_SPEED" \
    -v rt="$REF_SECONDS" -v f="$FIXED_SECONDS" -v goal="$FIT_SECONDS" -v n="$NUM_IMAGES" \
    -v d="$DIRTY_IMAGES" -v gn="$given_images" -v gd="$given_dirty" 'BEGIN {
      est = f + (rt - f) * rp / p; s = (goal - f) / (est - f)
      if (s >= 1) {
        printf "%d %d training at %d images/s: about %d min, default sizes\n", n, d, p, est / 60 + 0.5
        exit
      }
      if (gn == "") { n = int(n * s / 500 + 0.5) * 500; if (n < 2000) n = 2000 }
      if (gd == "") { d = int(d * s / 500 + 0.5) * 500; if (d < 2000) d = 2000 }
      printf "%d %d training at %d images/s: about %d min at the default sizes, so NUM_IMAGES=%d", n, d, p, est / 60 + 0.5, n
      printf " DIRTY_IMAGES=%d (x%.2f) for about %d min (FIT=0 keeps the sizes)\n", d, s, goal / 60 + 0.5
    }')
  probed=1
fi
if [ "$PLAN" = 1 ]; then
  echo "run_all.sh --plan: ${fit_note:-no fitting (FIT=0, FAST=1 or DATA given)}; NUM_IMAGES=$NUM_IMAGES DIRTY_IMAGES=$DIRTY_IMAGES"
  exit 0
fi
mkdir -p "$R/.done"
if [ "$probed" = 1 ]; then
  printf 'NUM_IMAGES=%s\nDIRTY_IMAGES=%s\n' "$NUM_IMAGES" "$DIRTY_IMAGES" >"$R/sizes.env.tmp"
  mv "$R/sizes.env.tmp" "$R/sizes.env"
fi
[ -z "$fit_note" ] || echo "run_all.sh: $fit_note"
TIMES="$R/times.tsv"
T0=$(date +%s.%N)

# Flags every torch script understands.
common=(--device "$DEVICE" --quiet)
[ -n "$THREADS" ] && common+=(--threads "$THREADS")
train_flags=("${common[@]}" --amp "$AMP" --model "$MODEL" --random-seed "$SEED")
eval_flags=("${common[@]}")
# soup.py/infer.py get AMP too (auto included, as soon as they accept it: checked above)
[ "$eval_amp" = yes ] && eval_flags+=(--amp "$AMP")

seconds_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

n_stage=0
# stage NAME DONE -- CMD...: run CMD unless DONE exists; record its wall time in times.tsv.
# DONE is the file the command writes last (a summary.json), or a stamp under .done/ that is
# touched after CMD succeeds (for commands whose outputs give no single "finished" file).
stage() {
  local name=$1 done=$2
  shift 3
  n_stage=$((n_stage + 1))
  if [ -e "$done" ]; then
    echo "== skip $name ($done exists)"
    return 0
  fi
  echo "== [$n_stage] $name: ${*##"$ROOT"/}"
  local t
  t=$(date +%s.%N)
  "$@"
  [ -e "$done" ] || touch "$done"
  printf '%s\t%s\n' "$name" "$(seconds_since "$t")" >>"$TIMES"
}

# train NAME ARGS...: train.py into $R/NAME; resumes an interrupted run (last.pt, no summary).
train() {
  local name=$1
  shift
  local resume=()
  [ -e "$R/$name/last.pt" ] && resume=(--resume)
  stage "$name" "$R/$name/summary.json" -- \
    "$PYTHON" "$ROOT/train.py" --data "$DATA" --out "$R" --name "$name" "${train_flags[@]}" \
    ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"} "${resume[@]}" "$@"
}

logged() {  # logged FILE CMD...: CMD's stdout also into FILE (complete only if CMD succeeds)
  local file=$1
  mkdir -p "$(dirname "$file")"
  shift
  "$@" | tee "$file.tmp"
  mv "$file.tmp" "$file"
}

# --- 1. data ------------------------------------------------------------------------------
if [ -z "$DATA" ]; then
  DATA="$R/data"
  stage synth_letters "$R/data/synth.json" -- \
    "$PYTHON" "$ROOT/synth.py" --mode letters --output-dir "$DATA" --num-images "$NUM_IMAGES" \
    --num-test "$NUM_TEST" --img-size "$IMG_SIZE" --seed "$SEED" --workers 2 --overwrite --quiet
fi

# --- 2. RotNet: rotation pre-training, per-block linear eval ------------------------------
# --opt sgd: the optimizer the chain was measured with (the recipe picks adamw under 300 steps)
train rot --task rotation --epochs "$ROT_EPOCHS" --aug "$AUG" --opt sgd
stage linear_eval "$R/rot_linear/linear_eval.json" -- \
  "$PYTHON" "$ROOT/train.py" --data "$DATA" --linear-eval "$R/rot/best.pt" --out "$R" \
  --name rot_linear --linear-epochs "$LINEAR_EPOCHS" --random-seed "$SEED" "${common[@]}"

# --- 3. few labels: from scratch vs RotNet-initialised ------------------------------------
few=(--labels-per-class "$LABELS_PER_CLASS" --epochs "$FEW_EPOCHS" --aug "$AUG" --opt adamw
  --eval-test)
train few_scratch "${few[@]}"
train few_rot "${few[@]}" --weights "$R/rot/best.pt"

# --- 4. supervised base model, fine-tuned ingredients, soups ------------------------------
train base --epochs "$EPOCHS" --aug "$AUG" --eval-test
ft_epochs=()
[ -n "$FT_EPOCHS" ] && ft_epochs=(--epochs "$FT_EPOCHS")
ingredients=() ckpts=()
for i in $(seq 1 "$N_INGREDIENTS"); do
  ing="i${i}_s${SEED}"
  ingredients+=("$ing")
  ckpts+=("$R/ft/$ing/best.pt")
  # --skip-existing resumes an interrupted ingredient; --same-split proves the held-out set.
  stage "ft_$ing" "$R/ft/$ing/summary.json" -- \
    "$PYTHON" "$ROOT/finetune.py" --data "$DATA" --weights "$R/base/best.pt" --out "$R" \
    --name ft --i "$i" --aug "$AUG" --same-split --skip-existing \
    "${train_flags[@]}" ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"} "${ft_epochs[@]}"
done
stage soup "$R/soup/summary.json" -- \
  "$PYTHON" "$ROOT/soup.py" --ingredients "${ckpts[@]}" --eval-individual \
  --uniform --greedy --plot --out "$R/soup" --overwrite "${eval_flags[@]}"

# --- 5. predictions: soups (with TTA) and every ingredient on val and test ----------------
# labels of the val split and the test part as id,label CSVs, for scoring the votes
stage labels "$R/.done/labels" -- "$PYTHON" - "$ROOT" "$DATA" "$R/labels" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import data  # noqa: E402
from common import UserError, atomic_write_text  # noqa: E402

path, out = sys.argv[2], Path(sys.argv[3])
for part in ("val", "test"):
    try:
        s, _ = data.load_split(path, part)
    except UserError as e:
        print(f"no {part} labels: {e}")
        continue
    if s.has_labels and not s.multi_label and len(s):
        rows = "".join(f"{i},{s.classes[int(y)]}\n" for i, y in zip(s.ids, s.labels))
        atomic_write_text(out / f"{part}.csv", "id,label\n" + rows)
        print(f"wrote {out / part}.csv ({len(s)} rows)")
EOF
has_test=0
[ -e "$R/labels/test.csv" ] && has_test=1
test_split="test"
[ "$has_test" = 1 ] || test_split=auto

infer() {  # infer NAME CKPT SPLIT ARGS...: $R/infer/NAME.csv (+ .metrics.json when labelled)
  local name=$1 ckpt=$2 split=$3
  shift 3
  stage "infer_$name" "$R/.done/infer_$name" -- \
    "$PYTHON" "$ROOT/infer.py" "$ckpt" --data "$DATA" --split "$split" \
    --out "$R/infer/$name.csv" "${eval_flags[@]}" "$@"
}
infer uniform_soup "$R/soup/uniform_soup.pt" "$test_split"
infer greedy_soup "$R/soup/greedy_soup.pt" "$test_split"
infer greedy_soup_tta_val "$R/soup/greedy_soup.pt" val --tta "$TTA"
infer greedy_soup_tta "$R/soup/greedy_soup.pt" "$test_split" --tta "$TTA"
cp "$R/infer/greedy_soup_tta.csv" "$R/submission.csv"
val_probs=() test_probs=()
for ing in "${ingredients[@]}"; do
  infer "${ing}_val" "$R/ft/$ing/best.pt" val --return-probs
  infer "${ing}_test" "$R/ft/$ing/best.pt" "$test_split" --return-probs
  val_probs+=("$R/infer/${ing}_val.npy")
  test_probs+=("$R/infer/${ing}_test.npy")
done

# --- 6. votes over the ingredients: soft (equal weights) and Caruana selection ------------
vote_val=() vote_test=()
[ -e "$R/labels/val.csv" ] && vote_val=(--labels "$R/labels/val.csv")
[ "$has_test" = 1 ] && vote_test=(--labels "$R/labels/test.csv")
stage vote_soft_val "$R/.done/vote_soft_val" -- \
  "$PYTHON" "$ROOT/vote.py" "${val_probs[@]}" --mode soft --out "$R/vote/soft_val.csv" \
  "${vote_val[@]}" --quiet
stage vote_soft "$R/.done/vote_soft" -- \
  "$PYTHON" "$ROOT/vote.py" "${test_probs[@]}" --mode soft --out "$R/vote/soft.csv" \
  "${vote_test[@]}" --quiet
if [ -e "$R/labels/val.csv" ]; then
  # logged: keeps vote.py's report (the val score the selection reached) for the summary
  stage vote_caruana "$R/.done/vote_caruana" -- logged "$R/vote/caruana.log" \
    "$PYTHON" "$ROOT/vote.py" "${test_probs[@]}" --select caruana \
    --val-probs "${val_probs[@]}" --val-labels "$R/labels/val.csv" \
    --out "$R/vote/caruana.csv" "${vote_test[@]}" --quiet
fi

# --- 7. dirty-MNIST: multi-label letters on noise, BCE, tuned thresholds ------------------
if [ "$DIRTY" = 1 ]; then
  stage synth_dirty "$R/dirty_data/synth.json" -- \
    "$PYTHON" "$ROOT/synth.py" --mode dirty --output-dir "$R/dirty_data" \
    --num-images "$DIRTY_IMAGES" --num-test "$DIRTY_TEST" --img-size 82 --letters-min 1 \
    --letters-max 2 --seed "$SEED" --workers 2 --overwrite --quiet
  # the multi-label preset (rot90, BCE, AdamW; README "Dirty MNIST preset"), shortened
  DATA="$R/dirty_data" train dirty --config "$ROOT/configs/dirty.yaml" \
    --img-size "$DIRTY_IMG_SIZE" --epochs "$DIRTY_EPOCHS"
  # 1-2 labels per image, as the synth line draws them (README "Dirty MNIST preset": the
  # bound doubles this short model's exact match)
  stage infer_dirty "$R/.done/infer_dirty" -- \
    "$PYTHON" "$ROOT/infer.py" "$R/dirty/best.pt" --split test --tta rot90 \
    --tune-threshold exact --min-labels 1 --max-labels 2 --out "$R/infer/dirty.csv" \
    "${eval_flags[@]}"
fi

# --- 8. summary table ---------------------------------------------------------------------
wall=$(seconds_since "$T0")
"$PYTHON" - "$R" "$ROOT" "$wall" "$TTA" "$LABELS_PER_CLASS" "${ingredients[@]}" <<'EOF'
import csv
import json
import os
import re
import sys
from pathlib import Path

R, ROOT, TTA, LPC, INGS = Path(sys.argv[1]), sys.argv[2], sys.argv[4], sys.argv[5], sys.argv[6:]
WALL = float(sys.argv[3])
sys.path.insert(0, ROOT)
from common import atomic_write_text, format_table, read_jsonl, write_json  # noqa: E402


def load(rel: str) -> dict:
    p = R / rel
    return json.loads(p.read_text()) if p.exists() else {}


times: dict[str, float] = {}  # the last recorded wall time of each stage
if (R / "times.tsv").exists():
    for line in (R / "times.tsv").read_text().splitlines():
        name, _, sec = line.partition("\t")
        times[name] = float(sec)


def infer_acc(name: str):
    """Accuracy from infer.py's metrics, only if it scored the split the column names."""
    m = load(f"infer/{name}.metrics.json")
    return m.get("accuracy") if m.get("split") == ("val" if "val" in name else "test") else None


def vote_acc(name: str):
    """Accuracy of a vote CSV (id,label) against the labels stage's CSV."""
    sub = R / "vote" / f"{name}.csv"
    lab = R / "labels" / ("val.csv" if "val" in name else "test.csv")
    if not (sub.exists() and lab.exists()):
        return None
    truth = dict(list(csv.reader(lab.open(newline="")))[1:])
    pred = list(csv.reader(sub.open(newline="")))[1:]
    return sum(truth.get(i) == y for i, y in pred) / max(1, len(pred))


rows = []


def add(section, result, val, test, stage, note=""):
    rows.append(dict(section=section, result=result, val_acc=val, test_acc=test,
                     stage=stage, seconds=times.get(stage), note=note))


rot = load("rot/summary.json")
add("rotnet", "RotNet pretext: rotation accuracy (4-way)", rot.get("best_val_acc"), None, "rot",
    "self-supervised, no labels")
for b in load("rot_linear/linear_eval.json").get("blocks", []):
    add("rotnet", f"RotNet linear eval, frozen {b['block']} ({b['dims']} features)",
        b["linear_acc"], None, "linear_eval", "probe on frozen features, all train labels")
for name, what in (("few_scratch", "from scratch"), ("few_rot", "RotNet-initialised")):
    s = load(f"{name}/summary.json")
    add("few_labels", f"{LPC} labels/class, {what}", s.get("best_val_acc"), s.get("test_acc"), name)
s = load("base/summary.json")
add("base", "supervised base model (all labels)", s.get("best_val_acc"), s.get("test_acc"), "base")
indiv = {}  # ingredient run name -> its line of soup.py's individual.jsonl
if (R / "soup/individual.jsonl").exists():
    indiv = {Path(r["path"]).parent.name: r for r in read_jsonl(R / "soup/individual.jsonl")}
for ing in INGS:
    r, g = indiv.get(ing, {}), indiv.get(ing, {}).get("grid", {})
    val = r.get("val_acc", load(f"ft/{ing}/summary.json").get("best_val_acc"))
    note = ", ".join(f"{k} {g[k]}" for k in ("lr", "epochs", "smoothing", "mix") if k in g)
    add("ingredients", f"ingredient {ing} (fine-tuned from base)", val,
        infer_acc(f"{ing}_test"), f"ft_{ing}", note)
soup = load("soup/summary.json")
uni, greedy = soup.get("uniform", {}), soup.get("greedy", {})
add("soups", f"uniform soup ({len(INGS)} ingredients)", uni.get("val_acc"),
    infer_acc("uniform_soup"), "soup")
add("soups", f"greedy soup ({greedy.get('n_kept', '?')}/{len(INGS)} kept)", greedy.get("val_acc"),
    infer_acc("greedy_soup"), "soup")
add("soups", f"greedy soup + TTA {TTA} (submission.csv)", infer_acc("greedy_soup_tta_val"),
    infer_acc("greedy_soup_tta"), "infer_greedy_soup_tta")
add("votes", f"soft vote over {len(INGS)} ingredients", vote_acc("soft_val"), vote_acc("soft"),
    "vote_soft")
car = None  # vote.py prints the val score its selection reached
if (R / "vote/caruana.log").exists():
    m = re.search(r"caruana: .*val accuracy ([0-9.]+)", (R / "vote/caruana.log").read_text())
    car = float(m.group(1)) if m else None
add("votes", "Caruana selection over ingredients", car, vote_acc("caruana"), "vote_caruana",
    "val acc: the set the weights were chosen on")
dirty, th = load("dirty/summary.json"), load("infer/dirty.thresholds.json")
if dirty:
    add("dirty", "dirty-MNIST exact match (multi-label, BCE)", dirty.get("best_val_acc"),
        infer_acc("dirty"), "dirty",
        f"val at 0.5; test: TTA rot90, 1-2 labels, thresholds tuned on val "
        f"({th.get('val_score_at_0.5', 0):.3f} -> {th.get('val_score_tuned', 0):.3f} there)")

try:
    load_avg = [round(x, 2) for x in os.getloadavg()]
except OSError:
    load_avg = None
total = round(sum(times.values()), 1)
summary = dict(run_dir=str(R), rows=rows, stage_seconds=times, stage_seconds_total=total,
               wall_seconds_this_invocation=WALL, load_average_at_end=load_avg)


def cell(v, fmt=".4f"):
    return "-" if v is None else format(v, fmt)


table = format_table(
    [[r["result"], cell(r["val_acc"]), cell(r["test_acc"]), cell(r["seconds"], ".1f"), r["note"]]
     for r in rows],
    ["result", "val acc", "test acc", "stage time (s)", "note"],
)
stages = format_table([[k, f"{v:.1f}"] for k, v in times.items()], ["stage", "wall time (s)"])
md = (f"# run_all.sh results: {R}\n\n{table}\n\nStage wall times (sum {total:.1f} s; this "
      f"invocation {WALL} s; load average at the end {load_avg}):\n\n{stages}\n")
write_json(R / "summary.json", summary)
atomic_write_text(R / "summary.md", md)
print(md)
print(f"wrote {R}/summary.md, {R}/summary.json, {R}/submission.csv")
EOF
