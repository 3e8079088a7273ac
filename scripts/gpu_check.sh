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
