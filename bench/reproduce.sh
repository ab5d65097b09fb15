#!/usr/bin/env bash
# Reproduce every figure in bench/RESULTS.md, one after the other (about 25 minutes on a
# 2-core machine). Outputs go to bench/results/ (not committed). Needs h2load
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

echo "== feedback on the serving path"
python -m bench.feedback_cost --streams 16 --seconds 4 --rounds 6

echo "== monitoring cost"
python -m bench.monitoring_cost --model tiny_mlp --streams 64 --seconds 8 --rounds 8 --pin

echo "== soak"
python -m bench.soak --minutes 3 --interval 10 --json "$out/soak.json"

echo "== batch scoring: gateway score in-process and through a gateway against session.run"
python -m bench.batch_score --rows 1000000 --heavy-rows 20000 --rounds 3 --json "$out/batch_score.json"
