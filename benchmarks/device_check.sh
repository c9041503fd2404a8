#!/usr/bin/env bash
# One run of every check that needs a CUDA GPU, for a lent GPU machine (or any CUDA box), from
# the repository root:
#
#     bash benchmarks/device_check.sh            # logs and JUnit files go to $OUT (or ./device-out)
#
# 1. tests/gpu (pytest -m gpu): CUDA training with bf16 and torch.compile, a checkpoint resumed
#    on the GPU, torchrun with nccl, ONNX Runtime and AOTInductor-CUDA artefacts of GPU-trained
#    models against eager;
# 2. the CPU suites with CUDA branches (training, compile; the AOTInductor integration module
#    only when the AOTInductor-CUDA test passed, since a load that segfaults kills pytest);
# 3. benchmarks/gpu_check.py: eager vs CUDA-graph replay (and the AOTInductor package when it
#    loads) at batch 1, 64 and 4096;
# 4. benchmarks/ddp_bench.py: one rank under torchrun with nccl and bf16, samples per second.
# STEPS picks some of them (default: "gpu_tests cuda_branches gpu_check ddp_bench").
# Python packages the machine lacks can travel as wheels in .whl/ (installed to /tmp/site when
# pydantic-settings does not import). A machine with torch, numpy, pandas, scikit-learn, onnx,
# onnxscript, onnxruntime and pytest needs only the settings stack; for CPython 3.12 on x86-64:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core pydantic-settings \
#     annotated-types typing-inspection python-dotenv typing-extensions
# (the versions of constraints.txt).
# Each step has its own time limit so one hang cannot eat the others; the last lines say which
# steps passed.
set -u
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! "$PY" -c "import pydantic_settings" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
started=$SECONDS
declare -A status

STEPS=${STEPS:-gpu_tests cuda_branches gpu_check ddp_bench}
step() {  # step NAME LIMIT_S COMMAND...: run, log to $OUT/NAME.log, remember the exit status
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) status[$name]=skipped; return ;; esac
  echo "== $name (limit ${limit}s, at $((SECONDS - started))s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status[$name]=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name exit ${status[$name]} after $((SECONDS - started))s"
}

{ nvidia-smi -L; nproc
  "$PY" -c 'import torch, onnxruntime as ort; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "ort", ort.__version__)'
} 2>&1 | tee "$OUT/env.log"

pytest_args=(-p no:randomly -p no:cacheprovider -q -rfE --durations=12)
step gpu_tests 240 "$PY" -m pytest "${pytest_args[@]}" -m gpu tests/gpu --junitxml="$OUT/gpu_tests.xml"
aoti_ok=0
# Read as XML: pytest writes several test cases on one line of its JUnit file.
"$PY" - "$OUT/gpu_tests.xml" <<'PYEOF' && aoti_ok=1
import sys, xml.etree.ElementTree as ET
try:
    cases = ET.parse(sys.argv[1]).getroot().iter("testcase")
except (OSError, ET.ParseError):
    sys.exit(1)
name = "test_a_cuda_aotinductor_package_of_a_gpu_trained_model_matches_eager"
ok = [c.find("failure") is None and c.find("error") is None and c.find("skipped") is None
      for c in cases if c.get("name") == name]
sys.exit(0 if ok == [True] else 1)
PYEOF
cuda_branch=(tests/unit/test_training.py tests/unit/test_compile.py)
[ "$aoti_ok" = 1 ] && cuda_branch+=(tests/integration/test_aotinductor.py)
step cuda_branches 120 "$PY" -m pytest "${pytest_args[@]}" "${cuda_branch[@]}"
gpu_check_args=(--budget-s 90)
[ "$aoti_ok" = 1 ] || gpu_check_args+=(--no-aoti)
step gpu_check 150 "$PY" benchmarks/gpu_check.py "${gpu_check_args[@]}"
step ddp_bench 150 "$PY" benchmarks/ddp_bench.py --nproc 1 --device cuda --rows 2000000 \
  --epochs 4 --batch-size 8192 --hidden 512 --json

echo "aotinductor_cuda_ok=$aoti_ok total_s=$((SECONDS - started))"
for name in gpu_tests cuda_branches gpu_check ddp_bench; do echo "$name=${status[$name]}"; done
