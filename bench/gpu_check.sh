#!/usr/bin/env bash
# One-shot check of fastmsc on a machine with one CUDA GPU, in at most 6 minutes wall including every
# compile. Installs nothing: the repository is used in place through PYTHONPATH.
#
#   bash bench/gpu_check.sh                  # on the GPU machine; outputs in $OUT (default: a new temp folder)
#   bash bench/gpu_check.sh --dry-run        # the same steps, caps and outputs on a CPU-only machine (< 1 min)
#   bash bench/gpu_check.sh --steps env,cuda_tests    # only these steps (ext_build and ext_wait go together)
#
# Steps, in order, each with the seconds it has reserved (its cap; the sum, plus 15 s for the final report,
# is the 360 s budget). A step is killed at min(its cap, what the budget leaves after the steps still to
# come), so a slow step cannot eat a later step's time; a step that no longer fits is SKIPPED.
#   env            15  nvidia-smi, versions (python, torch, CUDA, cuDNN, triton, numpy, pytest plugins, nvcc, ninja)
#   ext_build      --  background: JIT build of the LSTM extension for the GPU's architecture only
#                      (TORCH_CUDA_ARCH_LIST, e.g. 9.0 on an H200), then `python -m fastmsc info`. Its
#                      deadline leaves the steps after ext_wait their caps; it runs while the steps below compile
#   triton_warmup  55  one process per Triton op and dtype (float32, bfloat16), all at once: 1 timed call
#                      per case, which compiles every Triton kernel of the benchmark into the shared
#                      $TRITON_CACHE_DIR (one process would compile them one after another)
#   bench_f32      45  fastmsc bench --no-compile --write-dispatch, float32, conv / attention / pooling
#   bench_bf16     35  the same in bfloat16 (optional: skipped without failing when time is short)
#   ext_wait       25  waits for ext_build (at least 25 s, more when earlier steps left time over)
#   bench_lstm     65  fastmsc bench --no-compile --write-dispatch: lstm_layer and the model's train step in
#                      float32, then lstm_layer in bfloat16 (skipped when the extension did not build)
#   cuda_tests    105  pytest -m cuda tests -n auto (pytest-xdist, if present), --timeout per test
#                      (pytest-timeout, if present), --junitxml
#   bench_compile  --  torch.compile rows (--backends torch compile) in whatever time is left; optional,
#                      run only with 60 s or more left
# Bench steps pass --time-budget (their cap less a margin), so they end on their own with `skipped` rows;
# every row reaches bench.csv as soon as its case ends, so a step killed at its cap keeps its rows. When the
# extension build fails or overruns, later processes are pointed at an extension folder that cannot be
# created (FASTMSC_EXT_DIR under /dev/null), so none of them starts an nvcc build of its own.
#
# The end of the output, in this order: (a) the benchmark table (`fastmsc bench --table-from` of every row
# written, or a one-line-per-case digest when that table is longer than 7000 characters), (b) the CUDA
# test summary (counts, each failing test with its reason), (c) every step with status, time and cap, and
# the total. Exit status 0 only if every step passed (an optional step skipped for time does not count).
#
# Outputs, in $OUT (at most 8 files, checked at the end):
#   gpu_check.log  everything printed, plus the extension build's log
#   env.txt        nvidia-smi, versions, `fastmsc info`
#   bench.csv      every benchmark row (fastmsc bench --csv)
#   dispatch_table.json  the package's dispatch table with this GPU's verdicts merged in (--write-dispatch)
#   cuda_tests.xml the CUDA tests' JUnit XML
#   steps.txt      the step summary (c)
#   summary.txt    (a) with the full table, (b) and (c)
# Caches (Triton, TorchInductor, the extension build) and scratch files go to $GPU_CHECK_WORK (default
# ${TMPDIR:-/tmp}/fastmsc_gpu_check), so a second run on the same machine starts warm.
#
# --dry-run replaces each GPU command with a cheap CPU stand-in (fastmsc bench --device cpu --quick on one
# op, fastmsc info without the extension build, the CUDA tests run on CPU where they all skip), keeping
# the steps, caps, budget logic and outputs. Test hooks: GPU_CHECK_BUDGET (seconds, default 360),
# GPU_CHECK_CAP_<step> (a step's cap), GPU_CHECK_TABLE_CHARS (7000), and in --dry-run only
# GPU_CHECK_SLEEP_<step> (seconds a step sleeps after its work, to overrun its cap).
# Set PYTHON to pick the interpreter (default python3).

# shellcheck disable=SC2317  # the step_* functions are called indirectly ("step_$name")
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"

# ---------------------------------------------------------------------------------------------------------
# The plan: steps, caps, budget and outputs (the header above describes them; keep both in step).
BUDGET=${GPU_CHECK_BUDGET:-360}
REPORT_RESERVE=15  # seconds kept for the final report (--table-from, test summary, output check)
STEPS=(env ext_build triton_warmup bench_f32 bench_bf16 ext_wait bench_lstm cuda_tests bench_compile)
declare -A CAP=([env]=15 [ext_build]=0 [triton_warmup]=55 [bench_f32]=45 [bench_bf16]=35 [ext_wait]=25
                [bench_lstm]=65 [cuda_tests]=105 [bench_compile]=0)
declare -A ABOUT=(
    [env]="nvidia-smi and versions"
    [ext_build]="LSTM extension build, in the background"
    [triton_warmup]="Triton kernels compiled by parallel one-call benchmark processes"
    [bench_f32]="float32 benchmark of the Triton ops, without torch.compile"
    [bench_bf16]="bfloat16 benchmark of the Triton ops, without torch.compile"
    [ext_wait]="waiting for the LSTM extension build"
    [bench_lstm]="LSTM (float32, bfloat16) and model benchmark"
    [cuda_tests]="tests marked cuda"
    [bench_compile]="torch.compile rows in the time left"
)
OPTIONAL=" bench_bf16 bench_compile "  # skipped for want of time without failing the run
ELASTIC=" ext_wait bench_compile "      # may also use time earlier steps left over
MIN_START=10       # a step with less than this left is skipped
COMPILE_MIN=60     # the torch.compile step needs this much to be worth starting
KILL_GRACE=5       # timeout --kill-after: SIGKILL this long after SIGTERM
OUTPUTS=(gpu_check.log env.txt bench.csv dispatch_table.json cuda_tests.xml steps.txt summary.txt)
MAX_OUTPUTS=8
TABLE_MAX_CHARS=${GPU_CHECK_TABLE_CHARS:-7000}
# A JIT build of the extension fails at once here (mkdir under /dev/null), instead of starting nvcc again.
NO_BUILD_DIR=/dev/null/fastmsc_gpu_check_no_extension_build

for name in "${STEPS[@]}"; do
    override="GPU_CHECK_CAP_${name}"
    [ -n "${!override:-}" ] && CAP[$name]=${!override}
done

now() { date +%s; }

# ---------------------------------------------------------------------------------------------------------
# Step bodies. Each runs in its own `bash gpu_check.sh --step NAME` under `timeout`, in the repository,
# with STEP_START and STEP_CAP set; its exit status is the step's.

step_left() {  # step_left MARGIN: seconds of this step's cap left, less MARGIN (at least 1)
    local left=$(( STEP_START + STEP_CAP - $(now) - $1 ))
    [ "$left" -ge 1 ] && echo "$left" || echo 1
}

dry() { [ "$GPU_CHECK_DRY" = 1 ]; }

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
    TRITON_OPS=(max_avg_pool)
    WARMUP_DTYPES=(float32)
    LSTM_OPS=(lstm_layer)
    COMPILE_OPS=(max_avg_pool)
    DISPATCH=()
else
    TRITON_OPS=(attention multiscale_conv1d max_avg_pool)  # slowest to compile first
    WARMUP_DTYPES=(float32 bfloat16)
    LSTM_OPS=(lstm_layer model)
    COMPILE_OPS=(max_avg_pool attention multiscale_conv1d lstm_layer model)  # cheapest compiles first
    DISPATCH=(--write-dispatch "${OUT:-}/dispatch_table.json")
fi

bench() {  # fastmsc bench on this run's device, rows appended to $OUT/bench.csv (a later --csv wins)
    if dry; then
        "$PYTHON" -m fastmsc bench --device cpu --quick --modes fwd --repeats 1 --warmup 0 --csv "$OUT/bench.csv" "$@"
    else
        "$PYTHON" -m fastmsc bench --device cuda --csv "$OUT/bench.csv" "$@"
    fi
}

bench_rows() {  # bench_rows COMMAND...: run it, then say how many rows of which status it added
    local before rc
    before=$("$PYTHON" bench/gpu_check_report.py count "$OUT/bench.csv")
    "$@"
    rc=$?
    echo "--> exit ${rc}; $("$PYTHON" bench/gpu_check_report.py rows "$OUT/bench.csv" --start "$before")"
    return "$rc"
}

step_env() {
    {
        echo "date $(date -u +%FT%TZ), host $(uname -n), $(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
        echo "repository $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi
            nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv
        else
            echo "nvidia-smi: not found"
        fi
        if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
        echo "c++: $( (command -v c++ >/dev/null && c++ --version | head -n 1) || echo 'not found'); TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
        "$PYTHON" - "$RUN/env_line" <<'PY'
import importlib.metadata as md
import os
import platform
import sys

import torch

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"

try:
    import triton
    triton_version = triton.__version__
except Exception as exc:  # noqa: BLE001 - report whatever stops the import
    triton_version = f"unusable ({type(exc).__name__}: {exc})"
from torch.utils import cpp_extension

print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"triton {triton_version}, numpy {version('numpy')}")
print(f"pytest {version('pytest')}, pytest-xdist {version('pytest-xdist')}, pytest-timeout {version('pytest-timeout')}, "
      f"matplotlib {version('matplotlib')}")
print(f"ninja available: {cpp_extension.is_ninja_available()}, CUDA_HOME {cpp_extension.CUDA_HOME}")
line = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
        f"python {platform.python_version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)")
    print(f"GPU 0: {gpu}; {torch.cuda.device_count()} visible; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    line = f"{gpu}; {line}"
else:
    print("torch sees no CUDA GPU")
    line = f"no CUDA GPU; {line}"
with open(sys.argv[1], "w") as f:
    f.write(line + "\n")
sys.exit(0 if torch.cuda.is_available() or os.environ.get("GPU_CHECK_DRY") == "1" else 3)
PY
    } 2>&1 | tee "$OUT/env.txt"
    return "${PIPESTATUS[0]}"
}

step_ext_build() {
    local rc
    if dry; then  # one process: where the sources are, then `fastmsc info` (which cannot build here)
        "$PYTHON" - <<'PY'
import sys

from fastmsc import _extension
from fastmsc.cli import main

print(f"LSTM extension sources: {_extension.source_dir()} (dry run: nothing is built)")
main(["info"])
sys.exit(_extension.source_dir() is None)
PY
        return
    else
        "$PYTHON" - <<'PY'
import importlib.util
import sys
import time

from fastmsc import _extension

start = time.perf_counter()
reason = None
if importlib.util.find_spec("fastmsc._C") is not None:  # an installed build: the one every process loads
    reason = _extension.unavailable_reason()
else:
    try:
        _extension.jit_build()  # its error carries the compiler's output
    except Exception as exc:  # noqa: BLE001 - any failure means no extension
        reason = f"{type(exc).__name__}: {exc}"
if reason is None and not _extension.has_cuda_kernels():
    reason = "the extension has no CUDA kernels (nvcc missing, or torch saw no GPU while building)"
took = time.perf_counter() - start
if reason is None:
    print(f"LSTM extension ready in {took:.0f} s: {_extension.origin() or _extension.cache_dir()}")
else:
    print(f"LSTM extension unavailable after {took:.0f} s: {reason}")
sys.exit(0 if reason is None else 1)
PY
        rc=$?
    fi
    if [ "$rc" -ne 0 ]; then
        FASTMSC_EXT_DIR=$NO_BUILD_DIR "$PYTHON" -m fastmsc info
    else
        "$PYTHON" -m fastmsc info
    fi
    return "$rc"
}

step_triton_warmup() {
    local dtype op tag worst=0 rc pids=() tags=()
    for dtype in "${WARMUP_DTYPES[@]}"; do
        for op in "${TRITON_OPS[@]}"; do
            tag="${op}_${dtype}"
            (
                start=$(now)
                bench --no-compile --backends fused --ops "$op" --dtype "$dtype" --repeats 1 --warmup 0 \
                    --csv "$RUN/warmup_${tag}.csv" --time-budget "$(step_left 20)" > "$RUN/warmup_${tag}.log" 2>&1
                rc=$?
                echo "warm-up ${op} ${dtype}: exit ${rc} in $(( $(now) - start ))s;" \
                    "$("$PYTHON" bench/gpu_check_report.py rows "$RUN/warmup_${tag}.csv")"
                exit "$rc"
            ) &
            pids+=($!)
            tags+=("$tag")
        done
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        if [ "$rc" -ne 0 ]; then
            worst=$rc
            tail -n 15 "$RUN/warmup_${tags[$i]}.log"
        fi
    done
    return "$worst"
}

step_bench_f32() {
    bench_rows bench --no-compile --dtype float32 --ops "${TRITON_OPS[@]}" "${DISPATCH[@]}" \
        --time-budget "$(step_left 20)"
}

step_bench_bf16() {
    bench_rows bench --no-compile --dtype bfloat16 --ops "${TRITON_OPS[@]}" "${DISPATCH[@]}" \
        --time-budget "$(step_left 20)"
}

step_bench_lstm() {
    local rc1 rc2 left
    # float32 first (the LSTM and the whole model); bfloat16 LSTM rows in what is left
    bench_rows bench --no-compile --dtype float32 --ops "${LSTM_OPS[@]}" "${DISPATCH[@]}" \
        --time-budget "$(step_left 35)"
    rc1=$?
    left=$(step_left 15)
    if [ "$left" -ge 5 ]; then
        bench_rows bench --no-compile --dtype bfloat16 --ops lstm_layer "${DISPATCH[@]}" --time-budget "$left"
        rc2=$?
    else
        echo "bfloat16 LSTM rows skipped: ${left}s left in this step"
        rc2=0
    fi
    [ "$rc1" -ne 0 ] && return "$rc1"
    return "$rc2"
}

step_cuda_tests() {
    local args plugins workers per_test
    args=(-m pytest -m cuda tests -q -rfE -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" --durations=5)
    plugins=$("$PYTHON" - <<'PY'
import importlib.metadata as md
found = []
try:
    major, minor = (int(p) for p in md.version("pytest-xdist").split(".")[:2])
    found.append("xdist-worksteal" if (major, minor) >= (3, 2) else "xdist")
except (md.PackageNotFoundError, ValueError):
    pass
try:
    md.version("pytest-timeout")
    found.append("timeout")
except md.PackageNotFoundError:
    pass
print(" ".join(found))
PY
)
    if dry; then workers=2; per_test=60; else workers=auto; per_test=90; fi
    case " $plugins " in
        *" xdist-worksteal "*) args+=(-n "$workers" --dist worksteal) ;;
        *" xdist "*) args+=(-n "$workers") ;;
        *) echo "pytest-xdist absent: the tests run in one process" ;;
    esac
    case " $plugins " in
        *" timeout "*) args+=(--timeout "$per_test") ;;
        *) echo "pytest-timeout absent: no per-test time limit" ;;
    esac
    echo "$PYTHON ${args[*]}"
    "$PYTHON" "${args[@]}"
}

step_bench_compile() {
    if dry; then  # torch.compile on CPU needs a C++ toolchain and 10 s or more per case: torch rows stand in
        bench_rows bench --dtype float32 --backends torch --ops "${COMPILE_OPS[@]}" --time-budget "$(step_left 50)"
    else
        bench_rows bench --dtype float32 --backends torch compile --ops "${COMPILE_OPS[@]}" \
            --time-budget "$(step_left 50)"
    fi
}

if [ "${1:-}" = "--step" ]; then  # internal: one step's body, under the parent's timeout
    cd "$REPO" || exit 2
    "step_$2"
    rc=$?
    sleep_var="GPU_CHECK_SLEEP_$2"
    if dry && [ -n "${!sleep_var:-}" ]; then
        echo "(dry run: sleeping ${!sleep_var}s to overrun the cap)"
        sleep "${!sleep_var}"
    fi
    date +%s > "$RUN/$2.end"
    exit "$rc"
fi

# ---------------------------------------------------------------------------------------------------------
# The driver.

usage() { sed -n '2,/^$/p' "$SELF" | sed 's/^# \{0,1\}//'; }

DRY=0
SELECTED=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) SELECTED="${2:-}"; shift ;;
        --steps=*) SELECTED="${1#--steps=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
SELECTED=" ${SELECTED//,/ } "
for name in $SELECTED; do
    [ -n "${CAP[$name]+x}" ] || { echo "gpu_check.sh: unknown step $name; steps: ${STEPS[*]}" >&2; exit 2; }
done
case "$SELECTED" in *" ext_build "*|*" ext_wait "*) SELECTED="$SELECTED ext_build ext_wait " ;; esac
selected() { [ -z "${SELECTED// /}" ] || [[ "$SELECTED" == *" $1 "* ]]; }

reserved=$REPORT_RESERVE
for name in "${STEPS[@]}"; do selected "$name" && reserved=$(( reserved + CAP[$name] )); done
if [ "$reserved" -gt "$BUDGET" ]; then
    echo "gpu_check.sh: the caps and the report's ${REPORT_RESERVE}s add up to ${reserved}s, over the ${BUDGET}s budget" >&2
    exit 2
fi

if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/fastmsc_gpu_check_out.XXXXXX") || exit 2
fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/fastmsc_gpu_check}
mkdir -p "$WORK" || exit 2
RUN=$(mktemp -d "$WORK/run.XXXXXX") || exit 2  # this run's scratch files, removed at exit
for name in "${OUTPUTS[@]}"; do rm -f "${OUT:?}/$name"; done  # a rerun into the same folder starts afresh
LOG=$OUT/gpu_check.log
: > "$LOG"
cd "$REPO" || exit 2

export OUT RUN PYTHON=${PYTHON:-python3} GPU_CHECK_DRY=$DRY
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
export FASTMSC_EXT_DIR=${FASTMSC_EXT_DIR:-$WORK/extension}
export MAX_JOBS=${MAX_JOBS:-4}
[ "$DRY" = 1 ] && export FASTMSC_EXT_DIR=$NO_BUILD_DIR  # the dry run builds no extension, nor lets anything try
# Triton compiles for the GPU (the interpreter is for CPU-only test machines); no poisoned outputs in timings.
unset TRITON_INTERPRET FASTMSC_POISON

T0=$(now)
DEADLINE=$(( T0 + BUDGET - REPORT_RESERVE ))
declare -A STATUS TOOK USED NOTE
FAILED_RUN=0
NO_GPU=0
EXT_PID=""

say() { echo "$@" | tee -a "$LOG"; }
elapsed() { echo $(( $(now) - T0 )); }

record() {  # record NAME STATUS SECONDS CAP NOTE: one line of the step summary
    STATUS[$1]=$2 TOOK[$1]=$3 USED[$1]=$4 NOTE[$1]=$5
    case "$2" in
        ok) ;;
        SKIPPED)
            case "$5" in
                "not selected"*) ;;
                "only "*) [[ "$OPTIONAL" == *" $1 "* ]] || FAILED_RUN=1 ;;
                *) FAILED_RUN=1 ;;
            esac ;;
        *) FAILED_RUN=1 ;;
    esac
}

later_caps() {  # seconds reserved by the selected steps after $1
    local total=0 seen=0 name
    for name in "${STEPS[@]}"; do
        if [ "$seen" = 1 ] && selected "$name"; then total=$(( total + CAP[$name] )); fi
        [ "$name" = "$1" ] && seen=1
    done
    echo "$total"
}

step_cap() {  # the cap step $1 gets now: its own (or all that is free, if elastic), never later steps' time
    local free=$(( DEADLINE - $(now) - $(later_caps "$1") ))
    if [[ "$ELASTIC" == *" $1 "* ]] || [ "$free" -lt "${CAP[$1]}" ]; then echo "$free"; else echo "${CAP[$1]}"; fi
}

skip_reason() {  # why step $1 cannot start with cap $2, or nothing
    if ! selected "$1"; then echo "not selected"
    elif [ "$NO_GPU" = 1 ]; then echo "no usable CUDA GPU (see env)"
    elif [ "$1" = bench_compile ] && [ "$2" -lt "$COMPILE_MIN" ]; then echo "only ${2}s left (needs ${COMPILE_MIN}s)"
    elif [ "$2" -lt "$MIN_START" ]; then echo "only ${2}s left"
    fi
}

run_step() {  # run_step NAME [NOTE]: the step in the foreground, under its cap
    local name=$1 cap reason start rc took note=${2:-}
    cap=$(step_cap "$name")
    reason=$(skip_reason "$name" "$cap")
    if [ -n "$reason" ]; then
        record "$name" SKIPPED 0 "$cap" "$reason"
        [ "$reason" = "not selected" ] || say "=== [$(elapsed)s] ${name}: SKIPPED (${reason})"
        return
    fi
    say ""
    say "=== [$(elapsed)s] ${name} (cap ${cap}s): ${ABOUT[$name]}"
    start=$(now)
    STEP_START=$start STEP_CAP=$cap timeout --kill-after="$KILL_GRACE" "$cap" bash "$SELF" --step "$name" \
        < /dev/null 2>&1 | tee -a "$LOG" "$RUN/$name.log"
    rc=${PIPESTATUS[0]}
    took=$(( $(now) - start ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" TIMEOUT "$took" "$cap" "killed at its cap${note:+; $note}"
    elif [ "$rc" -ne 0 ]; then
        record "$name" FAILED "$took" "$cap" "exit ${rc}${note:+; $note}"
    else
        record "$name" ok "$took" "$cap" "$note"
    fi
    local rows
    rows=$(grep -h '^--> exit' "$RUN/$name.log" 2>/dev/null | sed 's/^--> exit [0-9]*; //' | paste -sd';' - | sed 's/;/; /g')
    [ -n "$rows" ] && NOTE[$name]="${NOTE[$name]:+${NOTE[$name]}; }$rows"
    say "=== [$(elapsed)s] ${name}: ${STATUS[$name]} in ${took}s"
}

start_ext() {  # ext_build in the background, with a deadline that leaves the steps after ext_wait their caps
    local cap reason
    cap=$(( DEADLINE - $(now) - $(later_caps ext_wait) ))
    reason=$(skip_reason ext_build "$cap")
    if [ -n "$reason" ]; then
        record ext_build SKIPPED 0 "$cap" "$reason"
        return
    fi
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null; then
        local arch
        arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
        [[ "$arch" =~ ^[0-9]+\.[0-9]+$ ]] && export TORCH_CUDA_ARCH_LIST=$arch
    fi
    say ""
    say "=== [$(elapsed)s] ext_build started in the background (deadline ${cap}s, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-torch default}, FASTMSC_EXT_DIR=$FASTMSC_EXT_DIR)"
    EXT_START=$(now)
    EXT_CAP=$cap
    STEP_START=$EXT_START STEP_CAP=$cap timeout --kill-after="$KILL_GRACE" "$cap" bash "$SELF" --step ext_build \
        < /dev/null > "$RUN/ext_build.log" 2>&1 &
    EXT_PID=$!
}

wait_ext() {  # the ext_wait step: join the background build, record both
    local cap reason start rc end
    if [ -z "$EXT_PID" ]; then
        cap=$(step_cap ext_wait)
        reason=$(skip_reason ext_wait "$cap")
        record ext_wait SKIPPED 0 "$cap" "${reason:-the build did not start}"
        return
    fi
    start=$(now)
    say ""
    say "=== [$(elapsed)s] ext_wait (until the build's deadline, $(( EXT_START + EXT_CAP - start ))s from now): ${ABOUT[ext_wait]}"
    wait "$EXT_PID"
    rc=$?
    EXT_PID=""
    end=$(cat "$RUN/ext_build.end" 2>/dev/null || now)
    record ext_wait ok $(( $(now) - start )) $(( EXT_START + EXT_CAP - start )) ""
    say "--- ext_build log"
    tee -a "$LOG" < "$RUN/ext_build.log"
    sed -n '/^fastmsc: /,$p' "$RUN/ext_build.log" >> "$OUT/env.txt"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record ext_build TIMEOUT $(( end - EXT_START )) "$EXT_CAP" "killed at its deadline; LSTM steps skipped"
    elif [ "$rc" -ne 0 ]; then
        record ext_build FAILED $(( end - EXT_START )) "$EXT_CAP" "exit ${rc}; LSTM steps skipped"
    else
        record ext_build ok $(( end - EXT_START )) "$EXT_CAP" "in the background"
    fi
    if [ "$rc" -ne 0 ] && [ "$FASTMSC_EXT_DIR" != "$NO_BUILD_DIR" ]; then
        rm -f "$FASTMSC_EXT_DIR"/*/lock  # a killed build leaves torch's lock file, on which later loads would wait
        export FASTMSC_EXT_DIR=$NO_BUILD_DIR
    fi
    say "=== [$(elapsed)s] ext_build: ${STATUS[ext_build]} in ${TOOK[ext_build]}s"
}

cleanup() {
    if [ -n "$EXT_PID" ]; then kill -TERM "$EXT_PID" 2>/dev/null; wait "$EXT_PID" 2>/dev/null; fi
    rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------------------
plan=""
for name in "${STEPS[@]}"; do
    selected "$name" || continue
    if [ "$name" = ext_build ]; then plan+=" $name (background)"
    elif [[ "$ELASTIC" == *" $name "* ]]; then plan+=" $name ${CAP[$name]}s+"
    else plan+=" $name ${CAP[$name]}s"; fi
done
say "fastmsc GPU check$([ "$DRY" = 1 ] && echo ' (DRY RUN on CPU: stand-in commands)'); outputs in $OUT; caches in $WORK"
say "budget ${BUDGET}s: report ${REPORT_RESERVE}s +${plan} (s+: also the time earlier steps leave)"

if [ -f fastmsc/dispatch_table.json ]; then cp fastmsc/dispatch_table.json "$OUT/dispatch_table.json"; fi

run_step env
[ "${STATUS[env]}" = FAILED ] && [ "${NOTE[env]}" = "exit 3" ] && NO_GPU=1
start_ext
run_step triton_warmup
run_step bench_f32
run_step bench_bf16
wait_ext
if selected bench_lstm && [ "${STATUS[ext_build]}" != ok ] && [ "${STATUS[ext_build]}" != SKIPPED ]; then
    record bench_lstm SKIPPED 0 "${CAP[bench_lstm]}" "LSTM extension unavailable"
    say "=== [$(elapsed)s] bench_lstm: SKIPPED (LSTM extension unavailable)"
else
    run_step bench_lstm
fi
run_step cuda_tests "$([ "$FASTMSC_EXT_DIR" = "$NO_BUILD_DIR" ] && [ "$DRY" = 0 ] && echo 'LSTM tests skip: no extension')"
run_step bench_compile

# ---------------------------------------------------------------------------------------------------------
# The report: (a) table, (b) tests, (c) steps, at the very end of the output.
REPORT_START=$(now)
report() { "$PYTHON" bench/gpu_check_report.py "$@"; }
rule() { printf '=%.0s' {1..30}; printf ' %s ' "$1"; printf '=%.0s' {1..30}; echo; }

table_full="$RUN/table.txt"
table_shown="$RUN/table_shown.txt"
rows=$(report count "$OUT/bench.csv" 2>/dev/null || echo 0)
if [ "$rows" -gt 0 ]; then
    kept=$(report filter "$OUT/bench.csv" "$RUN/table.csv")
    timeout --kill-after=2 30 "$PYTHON" -m fastmsc bench --table-from "$RUN/table.csv" > "$table_full" 2>&1
    table_rc=$?
    echo "bench.csv: ${kept}; $(report rows "$OUT/bench.csv")" >> "$table_full"
    if [ "$table_rc" -eq 0 ] && [ "$(wc -c < "$table_full")" -le "$TABLE_MAX_CHARS" ]; then
        cp "$table_full" "$table_shown"
    else
        {
            if [ "$table_rc" -eq 0 ]; then
                echo "digest of the table: the full one ($(wc -c < "$table_full") characters) is in summary.txt"
            else
                echo "digest of the table (fastmsc bench --table-from exited ${table_rc}: see summary.txt)"
            fi
            report digest "$RUN/table.csv"
            echo "bench.csv: ${kept}; $(report rows "$OUT/bench.csv")"
        } > "$table_shown"
    fi
else
    echo "no benchmark rows were written (see the bench steps in gpu_check.log)" > "$table_full"
    cp "$table_full" "$table_shown"
fi

tests_txt="$RUN/tests.txt"
{
    if [ -s "$OUT/cuda_tests.xml" ]; then
        report tests "$OUT/cuda_tests.xml"
    else
        echo "no test results: cuda_tests ${STATUS[cuda_tests]} (${NOTE[cuda_tests]})"
    fi
    if [ "${STATUS[cuda_tests]}" = TIMEOUT ] || [ "${STATUS[cuda_tests]}" = FAILED ]; then
        echo "last lines of the cuda_tests step:"
        tail -n 6 "$RUN/cuda_tests.log" 2>/dev/null | sed 's/^/  | /' | cut -c 1-200
    fi
    [ "${NOTE[cuda_tests]:-}" = "LSTM tests skip: no extension" ] && echo "  (the LSTM extension did not build: its tests skip)"
    [ "$DRY" = 1 ] && [ -s "$OUT/cuda_tests.xml" ] && echo "  (dry run: the CUDA tests ran on CPU, where they skip)"
} > "$tests_txt"

: > "$OUT/steps.txt"
: > "$OUT/summary.txt"
output_problems=$(report outputs "$OUT" --allowed "${OUTPUTS[@]}" --max "$MAX_OUTPUTS")
[ -n "$output_problems" ] && FAILED_RUN=1
record report ok $(( $(now) - REPORT_START )) "$REPORT_RESERVE" ""

steps_txt="$RUN/steps.txt"
{
    cat "$RUN/env_line" 2>/dev/null || echo 'environment: not recorded (the env step did not run to its end)'
    printf '%-14s %-8s %6s %6s  %s\n' step status time cap note
    for name in "${STEPS[@]}" report; do
        [ "${NOTE[$name]:-}" = "not selected" ] && continue
        printf '%-14s %-8s %5ss %5ss  %s\n' "$name" "${STATUS[$name]:-?}" "${TOOK[$name]:-0}" "${USED[$name]:-0}" "${NOTE[$name]:-}"
    done
    total=$(( $(now) - T0 ))
    printf '%-14s %-8s %5ss %5ss  %s\n' total "$([ "$FAILED_RUN" = 0 ] && echo ok || echo FAILED)" "$total" "$BUDGET" \
        "$(find "$OUT" -maxdepth 1 -type f | wc -l) files in $OUT"
    if [ -n "$output_problems" ]; then
        echo "output folder problems:"
        while IFS= read -r line; do echo "  $line"; done <<< "$output_problems"
    fi
    echo "exit status $FAILED_RUN$([ "$DRY" = 1 ] && echo ' (dry run)')"
} > "$steps_txt"
cp "$steps_txt" "$OUT/steps.txt"

{
    rule "(a) benchmark table"
    cat "$table_full"
    rule "(b) CUDA tests"
    cat "$tests_txt"
    rule "(c) steps"
    cat "$steps_txt"
} > "$OUT/summary.txt"

[ "$table_full" -ef "$table_shown" ] || cmp -s "$table_full" "$table_shown" || {
    echo; echo "--- full benchmark table"; cat "$table_full"; } >> "$LOG"
{
    echo
    rule "(a) benchmark table"
    cat "$table_shown"
    rule "(b) CUDA tests"
    cat "$tests_txt"
    rule "(c) steps"
    cat "$steps_txt"
} | tee -a "$LOG"
exit "$FAILED_RUN"
