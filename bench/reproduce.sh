#!/usr/bin/env bash
# Reproduce every figure in bench/RESULTS.md, one after the other (about 25 minutes on a
# 2-core machine, and about 20 more for the REST and gRPC runs against MLServer). Outputs go to
# bench/results/ (not committed). Needs h2load
# (apt-get install nghttp2-client) and the bench extra (pip install -e '.[bench]'); the MLServer
# peer creates its own virtualenv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
repo=$(mktemp -d)
trap 'rm -rf "$repo"' EXIT
python -c "from pathlib import Path; from bench.compare import build_repository; \
build_repository(Path('$repo'), 'heavy_mlp', 1)"

echo "== serving path: tiny MLP against the floor (h2load)"
python -m bench.compare --model tiny_mlp --streams 64 --seconds 8 --rounds 3 \
    --gateway-arg=--metrics-port=0 --json "$out/tiny_floor.json"
python -m bench.compare --model tiny_mlp --streams 64 --connections 4 --seconds 8 --rounds 3 \
    --gateway-arg=--metrics-port=0 --gateway-arg=--workers=2 --json "$out/tiny_floor_workers2.json"

echo "== serving path: tiny MLP, 1 and 64 streams, against floor and MLServer"
python -m bench --url gateway --model tiny_mlp --concurrency 1,64 --duration 8 --compare floor \
    --compare mlserver --limit --model-file gateway/demo_repository/tiny_mlp/1/model.onnx \
    --json "$out/tiny.json" --plot "$out/tiny.png"

echo "== serving path: heavy MLP, batch 1 x 64 streams and batch 8 x 16 streams"
python -m bench --url gateway --model-repository "$repo" --model heavy_mlp --concurrency 64 \
    --batch-size 1 --duration 10 --compare mlserver --limit \
    --model-file "$repo/heavy_mlp/1/model.onnx" --json "$out/heavy_b1.json"
python -m bench --url gateway --model-repository "$repo" --model heavy_mlp --concurrency 16 \
    --batch-size 8 --duration 10 --limit --model-file "$repo/heavy_mlp/1/model.onnx" \
    --json "$out/heavy_b8.json"
python -m bench.limit "$repo/heavy_mlp/1/model.onnx" --batch-sizes 1,8,16,32,64

echo "== operator state: change cost and propagation"
python -m bench.state --backend file --changes 200
python -m bench.state --backend redis --changes 200

echo "== HTTP/REST against gRPC, same gateway"
python -m bench.http_cost --model tiny_mlp --streams 1,64 --seconds 5 --rounds 5 \
    --json "$out/http_cost.json"

echo "== REST: the gateway against MLServer's REST endpoint (plain JSON: MLServer has no binary"
echo "   tensors), tiny (execution inline, and the default with the REST floor) and heavy MLP"
inline=$(mktemp -d)
mkdir -p "$inline/tiny_mlp/1"
cp gateway/demo_repository/tiny_mlp/1/model.onnx "$inline/tiny_mlp/1/"
{ cat gateway/demo_repository/tiny_mlp/config.pbtxt
  echo 'parameters { key: "execution" value { string_value: "inline" } }'; } \
    > "$inline/tiny_mlp/config.pbtxt"
python -m bench --protocol http --http-data json --url gateway --model-repository "$inline" \
    --model tiny_mlp --concurrency 1,64 --duration 8 --rounds 5 --compare mlserver \
    --model-file "$inline/tiny_mlp/1/model.onnx" --json "$out/rest_tiny_inline.json"
python -m bench --protocol http --http-data json --url gateway --model-repository "$repo" \
    --model heavy_mlp --concurrency 1,64 --duration 10 --rounds 5 --compare mlserver \
    --model-file "$repo/heavy_mlp/1/model.onnx" --json "$out/rest_heavy.json"
python -m bench --protocol http --http-data json --url gateway --model tiny_mlp \
    --concurrency 1,64 --duration 8 --rounds 5 --compare floor --compare mlserver \
    --model-file gateway/demo_repository/tiny_mlp/1/model.onnx --json "$out/rest_tiny.json"
rm -rf "$inline"
echo "== the same servers over gRPC, 1 and 64 in flight"
python -m bench --url gateway --model tiny_mlp --concurrency 1,64 --duration 8 --rounds 3 \
    --compare mlserver --model-file gateway/demo_repository/tiny_mlp/1/model.onnx \
    --json "$out/grpc_tiny_mlserver.json"
python -m bench --url gateway --model-repository "$repo" --model heavy_mlp --concurrency 1,64 \
    --duration 10 --rounds 3 --compare mlserver --model-file "$repo/heavy_mlp/1/model.onnx" \
    --json "$out/grpc_heavy_mlserver.json"
echo "== REST: binary tensors (tritonclient.http's default) against the REST floor; both clients"
python -m bench --protocol http --url gateway --model tiny_mlp --concurrency 1,64 --duration 8 \
    --rounds 3 --compare floor --json "$out/rest_tiny_binary.json"
python -m bench --protocol http --http-client aiohttp --url gateway --model tiny_mlp \
    --concurrency 64 --duration 8 --rounds 2 --compare floor --json "$out/rest_tiny_binary_aiohttp.json"

echo "== feedback on the serving path"
python -m bench.feedback_cost --streams 16 --seconds 4 --rounds 6

echo "== monitoring cost"
python -m bench.monitoring_cost --model tiny_mlp --streams 64 --seconds 8 --rounds 8 --pin

echo "== soak"
python -m bench.soak --minutes 3 --interval 10 --json "$out/soak.json"

echo "== batch scoring: gateway score in-process and through a gateway against session.run"
python -m bench.batch_score --rows 1000000 --heavy-rows 20000 --rounds 3 --json "$out/batch_score.json"
