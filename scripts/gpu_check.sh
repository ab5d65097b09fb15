#!/usr/bin/env bash
# The GPU check of issue 19 in one prepared run: onnxruntime-gpu on a machine without internet,
# the GPU integration tests, and the GPU bench. docs/gpu.md says how a session runs it.
#
#   scripts/gpu_check.sh prepare       here, with a package index: wheels for the device's
#                                      Python 3.12 (onnxruntime-gpu for CUDA 13, the gateway's
#                                      and the tests' dependencies, MLServer), installed into one
#                                      site folder, xz-packed and split into parts under .gpuwhl/
#                                      (git-ignored through .git/info/exclude), each small
#                                      enough to travel with one device call (64 MiB per call)
#   scripts/gpu_check.sh stage         on the device: move the parts this call carried to
#                                      /tmp/gpu-check (kept while the machine stays warm)
#   scripts/gpu_check.sh run [WHAT]    on the device: stage, unpack once all parts are there,
#                                      then WHAT = all (default) | tests | bench | env;
#                                      everything it records goes to $OUT
#
# Nothing here needs the network on the device. Timeouts: GPU_TEST_S (default 180) for the
# tests, GPU_BENCH_S (default 300) for the bench; the bench also stops its own plan early.
# GPU_BENCH_ARGS adds arguments to scripts/gpu_bench.py (e.g. "--models mlp --workers 2").
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
STORE=.gpuwhl                    # ignored: the parts, their checksums, the wheel cache
STAGE=${GPU_STAGE:-/tmp/gpu-check}
PART_MIB=${GPU_PART_MIB:-56}     # a part plus the working tree (a few MiB) under 64 MiB
OUT=${OUT:-$ROOT/gpu-out}
PY_VERSION=3.12                  # the device image's python3 (KINDS.md)
ORT_GPU="onnxruntime-gpu==1.31.1"  # built for CUDA 13.0 and cuDNN 9 (Dockerfile.gpu's pin)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
# What the device lacks or must have at our versions; the rest comes from its image.
CORE=("$ORT_GPU" flatbuffers grpcio grpcio-health-checking grpcio-reflection protobuf
      "tritonclient[grpc]" redis aiohttp prometheus-client nvidia-ml-py
      pytest pytest-asyncio pluggy iniconfig)
PEERS=(mlserver==1.7.1)          # the MLServer peer of the bench
# In the device image already, binary, and heavy: left out of the payload.
SKIP='(numpy|pandas|python_dateutil|six|tzdata|pytz|sympy|mpmath|ml_dtypes|setuptools)-[0-9]'

say() { printf '%s\n' "$*" >&2; }

platform_args() {
    local p args=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp)
    for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
    printf '%s\n' "${args[@]}"
}

prepare() {
    local pip=(python3 -m pip) exclude
    [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")" "$STORE/wheels"
    grep -qxF "/$STORE/" "$exclude" 2>/dev/null || echo "/$STORE/" >>"$exclude"
    mapfile -t plat < <(platform_args)
    # The versions this checkout is tested with (and MLServer's venv, when there is one).
    : >"$STORE/constraints.txt"
    if [ -x bench/.mlserver-venv/bin/python ]; then
        bench/.mlserver-venv/bin/python -m pip freeze --exclude-editable 2>/dev/null \
            | grep -E '^[A-Za-z0-9_.-]+==' >>"$STORE/constraints.txt"
    fi
    "${pip[@]}" freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' \
        | grep -viE '^(onnxruntime|onnxruntime-gpu)==' >"$STORE/ours.txt"
    # MLServer's pins hold its own dependencies together; ours win for what the gateway and
    # its tests import (the gRPC stubs need our grpcio and protobuf)
    python3 - "$STORE/ours.txt" "$STORE/constraints.txt" <<'PY'
import re, sys
ours, theirs = (open(p).read().split() for p in sys.argv[1:3])
key = lambda line: re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
mine = re.compile(r"^(grpcio.*|protobuf|tritonclient|pytest.*|pluggy|iniconfig|aiohttp|redis|"
                  r"prometheus-client|nvidia-ml-py|flatbuffers)$")
pins = {key(l): l for l in ours}
pins.update({key(l): l for l in theirs if not mine.match(key(l)) or key(l) not in pins})
pins = {k: v for k, v in pins.items() if not k.startswith("onnxruntime")}
open(sys.argv[2], "w").write("\n".join(sorted(pins.values())) + "\n")
PY
    say "downloading wheels for CPython $PY_VERSION manylinux x86_64 into $STORE/wheels ..."
    "${pip[@]}" download --quiet "${plat[@]}" -c "$STORE/constraints.txt" -d "$STORE/wheels" \
        "${CORE[@]}" "${PEERS[@]}" || { say "pip download failed"; return 1; }
    rm -rf "$STORE/build" && mkdir -p "$STORE/build/site"
    mapfile -t wheels < <(ls "$STORE"/wheels/*.whl | grep -vE "/$SKIP")
    "${pip[@]}" install --quiet --no-deps --no-index --no-compile --target "$STORE/build/site" \
        "${plat[@]}" "${wheels[@]}" || { say "pip install --target failed"; return 1; }
    rm -rf "$STORE/build/site/bin"
    (cd "$STORE/build/site" && ls -d ./*.dist-info | sed 's|^\./||; s|\.dist-info$||') \
        >"$STORE/CONTENTS"
    say "packing $(du -sh "$STORE/build/site" | cut -f1) with xz (several minutes) ..."
    rm -f "$STORE"/part.* "$STORE/payload.tar.xz"
    tar -C "$STORE/build" -cf - site | xz -T0 -6 >"$STORE/payload.tar.xz" || return 1
    sha256sum "$STORE/payload.tar.xz" | awk '{print $1}' >"$STORE/PAYLOAD.sha256"
    split -b "${PART_MIB}M" -d -a 2 "$STORE/payload.tar.xz" "$STORE/part."
    (cd "$STORE" && sha256sum part.* >SHA256SUMS)
    rm -rf "$STORE/payload.tar.xz" "$STORE/build"
    plan
}

plan() {
    local parts n i last
    parts=$(cd "$STORE" && ls part.* 2>/dev/null)
    n=$(echo "$parts" | grep -c .)
    [ "$n" -gt 0 ] || { say "no parts in $STORE: run scripts/gpu_check.sh prepare"; return 1; }
    last=$(echo "$parts" | tail -1)
    say ""
    say "$n parts in $STORE ($(du -ch "$STORE"/part.* | tail -1 | cut -f1) in all):"
    (cd "$STORE" && ls -l part.* | awk '{printf "  %s %.1f MiB\n", $NF, $5 / 1048576}') >&2
    say "device calls, one after the other (the machine keeps files for 30 s after a call):"
    i=0
    for p in $parts; do
        i=$((i + 1))
        if [ "$p" = "$last" ]; then
            say "  $i. carry [\"$STORE/$p\", \"$STORE/SHA256SUMS\", \"$STORE/PAYLOAD.sha256\"]" \
                "command \"bash scripts/gpu_check.sh run all\" timeout_s 540"
        else
            say "  $i. carry [\"$STORE/$p\", \"$STORE/SHA256SUMS\"] command" \
                "\"bash scripts/gpu_check.sh stage\" timeout_s 60"
        fi
    done
}

stage() {
    local f name want have missing
    mkdir -p "$STAGE/parts"
    for f in "$STORE"/part.*; do
        [ -e "$f" ] || continue
        name=$(basename "$f")
        want=$(awk -v n="$name" '$2 == n {print $1}' "$STORE/SHA256SUMS" 2>/dev/null)
        have=$(sha256sum "$f" | awk '{print $1}')
        if [ -n "$want" ] && [ "$want" != "$have" ]; then
            say "stage: $name does not match SHA256SUMS; not staged"
            continue
        fi
        mv -f "$f" "$STAGE/parts/$name"
    done
    if [ ! -f "$STAGE/machine.txt" ]; then  # first call on this machine: what it is
        { nvidia-smi -L; python3 -V; python3 -m pip list 2>/dev/null \
            | grep -iE '^(onnx|onnxruntime|grpcio|protobuf|numpy|pytest|nvidia-(cudnn|cublas|cuda-runtime))'
        } >"$STAGE/machine.txt" 2>&1
        cat "$STAGE/machine.txt" >&2
    fi
    [ -f "$STORE/SHA256SUMS" ] && cp -f "$STORE/SHA256SUMS" "$STAGE/parts/"
    [ -f "$STORE/PAYLOAD.sha256" ] && cp -f "$STORE/PAYLOAD.sha256" "$STAGE/parts/"
    missing=$(awk '{print $2}' "$STAGE/parts/SHA256SUMS" 2>/dev/null \
        | while read -r n; do [ -f "$STAGE/parts/$n" ] || echo "$n"; done)
    say "stage: staged $(cd "$STAGE/parts" && ls part.* 2>/dev/null | tr '\n' ' ')"
    if [ -n "$missing" ]; then
        say "stage: still missing: $(echo "$missing" | tr '\n' ' ')"
        say "stage: (a part staged earlier is gone if the machine was given back between calls:"
        say "        carry every part again, one per call)"
        return 3
    fi
    say "stage: every part is here"
    return 0
}

unpack() {
    local want have
    [ -f "$STAGE/site/.complete" ] && return 0
    stage || { say "run: cannot unpack, parts are missing"; return 3; }
    want=$(cat "$STAGE/parts/PAYLOAD.sha256" 2>/dev/null)
    have=$(cat "$STAGE"/parts/part.* | sha256sum | awk '{print $1}')
    if [ -n "$want" ] && [ "$want" != "$have" ]; then
        say "run: the joined parts do not match PAYLOAD.sha256"
        return 4
    fi
    rm -rf "$STAGE/site"
    cat "$STAGE"/parts/part.* | xz -dc | tar -x -C "$STAGE" || return 4
    touch "$STAGE/site/.complete"
    say "run: unpacked $(du -sh "$STAGE/site" | cut -f1) into $STAGE/site"
}

device_env() {
    # onnxruntime-gpu, our pins and MLServer before the image's packages; the image's CUDA 13
    # and cuDNN 9 (PyTorch's nvidia-* wheels, the toolkit) on the loader's path: the CUDA
    # provider has no RPATH and dlopens cuDNN.
    local purelib dirs d
    export PYTHONPATH="$STAGE/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
    purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    dirs=""
    for d in $(find "$purelib/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | sort) \
             /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && dirs="$dirs${dirs:+:}$d"
    done
    export LD_LIBRARY_PATH="$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

env_report() {
    {
        echo "== date"; date -u
        echo "== git"; git log --oneline -1 2>/dev/null || echo "(no git)"
        echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
        echo "== nvidia-smi -q (head)"; nvidia-smi -q 2>&1 | head -40
        echo "== cpu"; nproc; grep -m1 'model name' /proc/cpuinfo
        echo "== memory"; free -g
        echo "== LD_LIBRARY_PATH"; echo "$LD_LIBRARY_PATH" | tr ':' '\n'
        echo "== python and packages"
        python3 - <<'PY'
import importlib, sys
print(sys.version)
for name in ("onnxruntime", "numpy", "onnx", "grpc", "google.protobuf", "tritonclient",
             "pynvml", "mlserver", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name:16} {getattr(m, '__version__', '?'):12} {m.__file__}")
    except Exception as exc:
        print(f"{name:16} MISSING ({type(exc).__name__}: {exc})")
PY
        echo "== onnxruntime CUDA provider on a real session"
        python3 - <<'PY'
import tempfile, numpy as np, onnxruntime as ort
from bench import models
print("available:", ort.get_available_providers())
so = ort.SessionOptions(); so.log_severity_level = 1
path = models.build_mlp(tempfile.mktemp(suffix=".onnx"), (8, 16, 4))
s = ort.InferenceSession(path, so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("session providers:", s.get_providers())
print("output:", s.run(None, {"input": np.ones((2, 8), np.float32)})[0][0])
PY
    } >"$OUT/env.txt" 2>&1
    grep -A3 "session providers" "$OUT/env.txt" >&2 || tail -5 "$OUT/env.txt" >&2
}

run_tests() {
    say "== tests (timeout ${GPU_TEST_S:-180}s)"
    # Our pytest (from the payload) without the image's plugins, which may not suit it.
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -k 10 "${GPU_TEST_S:-180}" \
        python3 -m pytest -p no:cacheprovider -p pytest_asyncio.plugin -v -rs \
        --junitxml "$OUT/junit.xml" \
        tests/integration/test_gpu.py tests/unit/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest.log"
    return "${PIPESTATUS[0]}"
}

run_bench() {
    say "== bench (timeout ${GPU_BENCH_S:-300}s)"
    timeout -k 10 "${GPU_BENCH_S:-300}" python3 scripts/gpu_bench.py \
        --budget-s $(( ${GPU_BENCH_S:-300} - 20 )) --out "$OUT/gpu_bench.json" \
        ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    return "${PIPESTATUS[0]}"
}

run() {
    local what=${1:-all} rc=0
    mkdir -p "$OUT"
    unpack || return $?
    device_env
    env_report
    case "$what" in
        env) ;;
        tests) run_tests || rc=$? ;;
        bench) run_bench || rc=$? ;;
        all) run_tests || rc=$?; run_bench || rc=$(( rc ? rc : $? )) ;;
        *) say "run: unknown part $what (all, tests, bench, env)"; return 2 ;;
    esac
    say "== done (rc $rc): $(ls "$OUT" | tr '\n' ' ')"
    return "$rc"
}

case "${1:-}" in
    prepare) prepare ;;
    plan) plan ;;
    stage) stage; rc=$?; [ "$rc" -eq 3 ] && rc=0; exit "$rc" ;;  # missing parts: expected
    run) shift; run "$@" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
