#!/usr/bin/env bash
# GPU check (issue 14): every registered method for 2 tasks at full resolution on one GPU, with the
# paper profile's settings (`clbench reproduce clad`: 224 px WRN50-2 for PaDiM, PatchCore and CFA,
# 256 px for the others), on a synthetic `--profile mvtec` root of full-size originals, with short
# schedules (1 epoch); prints per method the seconds per step (timings.csv) and the peak CUDA
# memory (memory.csv). About 3-4 minutes on an H200 (budget: 5).
#
#   benchmarks/gpu_check.sh                      # the GPU check (needs CUDA: fails in one line otherwise)
#   AMP=1 benchmarks/gpu_check.sh                # the same with --amp (fp16 autocast + grad scaling)
#   DEVICE=cpu benchmarks/gpu_check.sh           # the plumbing on a CPU: tiny data, resnet18, 64 px (~3 min)
#   benchmarks/gpu_check.sh --dry-run            # generate the data, list the cells, run nothing
#
# Settings (environment): DEVICE (cuda), TASKS (2), COUNT_SCALE (0.2; 0.05 with DEVICE=cpu),
# MAX_EPOCHS (1), AMP (0), OUT (/tmp/clbench-gpu-check), ONLY (comma list of methods; default all).
# Backbones run random-init (`weights=none`: no download on an offline GPU machine; speed and memory
# do not depend on the weights); DRAEM's textures, EfficientAD's penalty images and teacher are the
# recorded stand-ins (the teacher distilled for 1 epoch).
set -euo pipefail

DRY_RUN=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN="--dry-run" ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
    esac
done

DEVICE="${DEVICE:-cuda}"
TASKS="${TASKS:-2}"
MAX_EPOCHS="${MAX_EPOCHS:-1}"
AMP="${AMP:-0}"
OUT="${OUT:-/tmp/clbench-gpu-check}"
ONLY="${ONLY:-}"
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

sets=(--set "tasks=$TASKS" --set "device=$DEVICE" --set "max_epochs=$MAX_EPOCHS" --set weights=none)
# EfficientAD's stand-in teacher: 1 epoch of distillation, cached under OUT (not in ~/.cache)
[[ -z "$ONLY" || ",$ONLY," == *,efficientad,* ]] && sets+=(--set method_params.distill_epochs=1
    --set "method_params.teacher_cache=$OUT/teachers")
synth=()
if [[ "$DEVICE" == cuda* ]]; then
    COUNT_SCALE="${COUNT_SCALE:-0.2}"
    # fail clearly without CUDA, and say what faiss sees (PatchCore's GPU index needs faiss GPUs)
    "$PYTHON" - "$DEVICE" <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}: "
             "torch.cuda.is_available() is False); DEVICE=cpu runs the plumbing check on the CPU")
import faiss
device = torch.device(sys.argv[1])
index = device.index if device.index is not None else torch.cuda.current_device()
print(f"gpu_check: {torch.cuda.get_device_name(index)} (cuda:{index} of {torch.cuda.device_count()}), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}, faiss {faiss.__version__} sees "
      f"{faiss.get_num_gpus() if hasattr(faiss, 'StandardGpuResources') else 0} GPU(s)")
EOF
else
    # the plumbing on a CPU: tiny originals, small images and backbone
    COUNT_SCALE="${COUNT_SCALE:-0.05}"
    synth=(--size 128)
    sets+=(--set image_size=64 --set crop_size=null --set backbone=resnet18)
    echo "gpu_check: DEVICE=$DEVICE: plumbing check (count scale $COUNT_SCALE, 128 px originals, 64 px, resnet18)"
fi
[[ "$AMP" == 1 ]] && sets+=(--set amp=true)

ROOT="$OUT/data-mvtec-$COUNT_SCALE${synth[*]:+-small}"
if [[ ! -f "$ROOT/.clbench-synthetic.json" ]]; then
    start=$(date +%s)
    "$PYTHON" -m clbench data synth --out "$ROOT" --profile mvtec --categories "$TASKS" --count-scale "$COUNT_SCALE" "${synth[@]}"
    echo "gpu_check: data generated in $(( $(date +%s) - start )) s"
fi

SWEEP="$OUT/sweeps/gpu_check"
rm -rf "$SWEEP"  # a re-run measures again (a sweep skips complete cells)
only=()
[[ -n "$ONLY" ]] && only=(--only "$ONLY")
start=$(date +%s)
status=0
"$PYTHON" -m clbench reproduce clad --data-root "$ROOT" --dtd procedural --imagenet procedural --teacher distil \
    --allow-random-init --executor serial --output "$OUT/sweeps" --name gpu_check "${only[@]}" "${sets[@]}" \
    $DRY_RUN || status=$?
[[ -n "$DRY_RUN" ]] && exit "$status"
echo "gpu_check: all cells in $(( $(date +%s) - start )) s"

"$PYTHON" - "$SWEEP/runs" <<'EOF'
"""Per cell: seconds per step (train + evaluate, timings.csv), backbone images/s, peak CUDA and RSS (memory.csv)."""
import csv
import sys
from pathlib import Path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


print(f"\n{'cell':30s} {'steps':>5s} {'train s':>8s} {'eval s':>8s} {'s/step':>8s} {'bb img/s':>9s} "
      f"{'peak CUDA MB':>12s} {'peak RSS MB':>11s}")
for run in sorted(Path(sys.argv[1]).iterdir()):
    if not (run / "timings.csv").is_file():
        print(f"{run.name:30s} FAILED (no timings.csv; see the sweep's output above)")
        continue
    timing = rows(run / "timings.csv")
    steps = sorted({r["step"] for r in timing})
    total = {p: sum(float(r["seconds"]) for r in timing if r["phase"] == p) for p in ("train", "evaluate", "backbone_forward")}
    images = sum(float(r["images"]) for r in timing if r["phase"] == "backbone_forward")
    rate = images / total["backbone_forward"] if total["backbone_forward"] > 0 else float("nan")
    peaks = {c: max((int(r["bytes"]) for r in rows(run / "memory.csv") if r["component"] == c), default=0)
             for c in ("peak_cuda", "peak_rss")}
    n = len(steps)
    complete = "" if (run / "summary.json").is_file() else "  (incomplete)"
    print(f"{run.name:30s} {n:5d} {total['train'] / n:8.2f} {total['evaluate'] / n:8.2f} "
          f"{(total['train'] + total['evaluate']) / n:8.2f} {rate:9.1f} {peaks['peak_cuda'] / 1e6:12.1f} "
          f"{peaks['peak_rss'] / 1e6:11.1f}{complete}")
EOF
exit "$status"
