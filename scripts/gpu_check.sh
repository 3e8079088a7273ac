#!/usr/bin/env bash
# One pass over the GPU tiers on a CUDA machine, every log kept: environment, build, gpu tests,
# benchmarks. Stages run in the order given; the default is all single-GPU stages.
#
#   scripts/gpu_check.sh [OUTDIR] [env] [build] [tests] [fp8] [comm] [pipeline] [train]
#
# With $DUALFLOW_CUDA_LIB pointing at a built library, `build` only checks that it loads.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu-logs}; shift || true
STAGES=${*:-env build tests fp8}
PY=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc)}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1} PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
status=0
step() {  # step NAME CMD...: run, log to OUTDIR/NAME.log, record the status
  local name=$1; shift
  local t0=$(date +%s)
  "$@" >"$OUTDIR/$name.log" 2>&1; local rc=$?
  printf '%-14s rc=%d  %4ds\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" | tee -a "$OUTDIR/summary.txt"
  [ $rc -eq 0 ] || status=1
}
# The comm kernels with 2, 4 and 8 ranks as processes sharing GPU 0: time-sliced, then under an MPS daemon
# started (and always stopped) here with its own pipe and log directories, so no other daemon is touched
# and the first run, with no daemon listening there, is time-sliced for certain; compute-sanitizer over
# one 2-rank pair; a table of cases run and passed per mode at the end.
comm_shared() {
  local report="$OUTDIR/comm_shared.jsonl" mps tool
  local tests="tests/comm/test_kernels_shared_gpu.py tests/comm/test_kernels_shared_training.py"
  rm -f "$report"
  mps=$(mktemp -d /tmp/dualflow-mps.XXXXXX)  # a short path: the pipes are Unix sockets
  export CUDA_MPS_PIPE_DIRECTORY=$mps/pipe CUDA_MPS_LOG_DIRECTORY=$mps/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  step comm_shared_timeslice env DUALFLOW_TEST_REPORT="$report" DUALFLOW_TEST_EXPECT_MPS=0 \
    $PY -m pytest $tests -m gpu -v -rs --timeout 900 -p no:cacheprovider
  if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      step "comm_shared_$tool" compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9 \
        $PY -m pytest tests/comm/test_kernels_shared_gpu.py -m gpu -k sanitizers -q --timeout 1200 -p no:cacheprovider
    done
  else
    echo "comm_shared: compute-sanitizer is not on PATH (it comes with the CUDA toolkit)" | tee -a "$OUTDIR/summary.txt"
    status=1
  fi
  if nvidia-cuda-mps-control -d; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT  # stopped however this script ends
    trap 'exit 130' INT TERM
    step comm_shared_mps env DUALFLOW_TEST_REPORT="$report" DUALFLOW_TEST_EXPECT_MPS=1 \
      $PY -m pytest $tests -m gpu -v -rs --timeout 900 -p no:cacheprovider
    echo quit | nvidia-cuda-mps-control
    trap - EXIT INT TERM
    cp -r "$CUDA_MPS_LOG_DIRECTORY" "$OUTDIR/mps_log" 2>/dev/null
  else
    echo "comm_shared: nvidia-cuda-mps-control -d failed, no MPS run" | tee -a "$OUTDIR/summary.txt"
    status=1
  fi
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  $PY - "$report" "$OUTDIR" <<'PY' | tee -a "$OUTDIR/summary.txt"
import json, pathlib, re, sys
report, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = {}
for line in report.read_text().splitlines() if report.exists() else []:
    r = json.loads(line)
    row = rows.setdefault((r["mode"], r["test"], r["ranks"]), [0, 0, []])
    row[0] += 1
    row[1] += r["passed"]
    row[2] += [] if r["passed"] else [r["case"]]
print(f"{'mode':<13} {'test':<10} {'ranks':>5} {'cases':>5} {'passed':>6}  failed")
for (mode, test, ranks), (n, ok, bad) in sorted(rows.items()):
    print(f"{mode:<13} {test:<10} {ranks:>5} {n:>5} {ok:>6}  {'; '.join(bad)}")
for tool in ("memcheck", "racecheck"):
    log = out / f"comm_shared_{tool}.log"
    if log.exists():
        # memcheck ends each process with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: N hazards"
        errors = [int(a or b) for a, b in re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard",
                                                     log.read_text())]
        clean = sum(e == 0 for e in errors)
        print(f"{'sanitizer':<13} {tool:<10} {2:>5} {len(errors):>5} {clean:>6}  (processes checked / clean)")
PY
}

for stage in $STAGES; do
  case $stage in
    env)
      step env bash -c "nvidia-smi; nvidia-smi topo -m; $PY -m dualflow info; $PY -m dualflow doctor" ;;
    build)
      if [ -n "${DUALFLOW_CUDA_LIB:-}" ]; then
        step build $PY -c "from dualflow import _cuda; _cuda.load(); print(_cuda.library_path(), _cuda.build_info())"
      else
        step build bash -c "cmake -S . -B build/cuda -DDUALFLOW_CUDA=ON && cmake --build build/cuda -j $JOBS"
      fi ;;
    tests)
      if [ "$NGPU" -ge 2 ]; then marks="gpu or multigpu"; else marks="gpu and not multigpu"; fi
      step tests $PY -m pytest tests -m "$marks" -q -rs --timeout 600 --continue-on-collection-errors ;;
    fp8)
      step fp8_gemm $PY benchmarks/fp8_gemm.py --json "$OUTDIR/bench.jsonl"
      step fp8_quant $PY benchmarks/fp8_quant.py --json "$OUTDIR/bench.jsonl" ;;
    comm)
      step moe_a2a torchrun --standalone --nproc-per-node "$NGPU" benchmarks/moe_a2a.py --json "$OUTDIR/bench.jsonl" ;;
    comm_shared)
      comm_shared ;;
    pipeline)
      step pipeline torchrun --standalone --nproc-per-node "$NGPU" benchmarks/pipeline.py --json "$OUTDIR/bench.jsonl" ;;
    train)
      if [ -f "configs/gpu$NGPU.toml" ]; then
        step train $PY benchmarks/train_throughput.py "configs/gpu$NGPU.toml" --keep "$OUTDIR/train_runs" \
          --json "$OUTDIR/bench.jsonl"
      else
        echo "train: no configs/gpu$NGPU.toml for $NGPU GPUs" | tee -a "$OUTDIR/summary.txt"
      fi ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
done
exit $status
