#!/usr/bin/env bash
# GPU smoke test of serving, for a session lent a GPU (device tool). Offline: tiny models built in code.
#
# Run as: bash bench/gpu/serve_smoke.sh [OUT_DIR]      (about 3-5 minutes; writes OUT_DIR/serve_smoke.md)
#
# 1. export parity on CUDA (tiny dense + MoE, merged == base + adapter), and the API/chat tests;
# 2. `radscribe serve --device cuda` on a tiny model: the openai client, plain and streaming;
# 3. bench/serve.py against the CUDA server (batching off vs on, 8 clients, 15 s each);
# 4. if vLLM is importable (by $VLLM_PYTHON, vLLM's own environment, else by this python): `radscribe serve --backend vllm` on a tiny merged export, one request through it.
set -uo pipefail
OUT="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT"
REPORT="$OUT/serve_smoke.md"
WORK="$(mktemp -d)"
PY="${PYTHON:-python}"
trap 'kill ${SERVER_PID:-} 2>/dev/null; rm -rf "$WORK"' EXIT
step() { echo; echo "== $*"; echo "- $*" >>"$REPORT"; }

{ echo "# serve GPU smoke ($(date -u +%Y-%m-%dT%H:%MZ))"; echo; echo '```'; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; echo '```'; } >"$REPORT"

step "pytest: export parity, API, chat (CUDA visible)"
"$PY" -m pytest -q -x tests/test_export.py tests/serve/test_api.py tests/serve/test_chat.py 2>&1 | tail -3 | tee -a "$REPORT"

step "radscribe serve --device cuda + openai client"
"$PY" -m radscribe.cli tiny-model --arch qwen3_vl_moe "$WORK/tiny-moe" >/dev/null
"$PY" -m radscribe.cli serve --model "$WORK/tiny-moe" --device cuda --port 8791 --api-key smoke &
SERVER_PID=$!
for _ in $(seq 120); do curl -sf http://127.0.0.1:8791/health >/dev/null && break; sleep 1; done
"$PY" - <<'PY' 2>&1 | tee -a "$REPORT"
import base64, io, time
import numpy as np, openai
from PIL import Image
buf = io.BytesIO(); Image.fromarray((np.random.rand(256, 256, 3) * 255).astype("uint8")).save(buf, format="PNG")
url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
client = openai.OpenAI(base_url="http://127.0.0.1:8791/v1", api_key="smoke", max_retries=0)
msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "findings?"}]}]
t = time.perf_counter(); text = client.chat.completions.create(model="radscribe", messages=msgs, max_tokens=32).choices[0].message.content
print(f"  plain: {len(text)} chars in {time.perf_counter() - t:.2f} s")
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="radscribe", messages=msgs, max_tokens=32, stream=True))
print(f"  stream == plain: {streamed == text}")
PY
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=

step "bench/serve.py --device cuda (8 clients, 15 s per mode)"
"$PY" bench/serve.py --device cuda --duration 15 --threads 4 --out "$OUT/serve_cuda.md" 2>&1 | grep -E "batching|speed-up|error" | tee -a "$REPORT"

step "vLLM backend on a tiny merged export"
VLLM_PY="${VLLM_PYTHON:-$PY}"  # vLLM's own environment (docs/serving.md); default: this one
if "$VLLM_PY" -c "import vllm" 2>/dev/null; then
  "$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
from peft import LoraConfig, get_peft_model
from radscribe.export import export
from radscribe.model.load import load_model
work = Path(sys.argv[1])
model, _ = load_model(work / "tiny-moe", device="cpu")
get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], init_lora_weights=False)).save_pretrained(work / "adapter")
export(work / "tiny-moe", work / "adapter", work / "export")
PY
  "$PY" -m radscribe.cli serve --backend vllm --vllm-python "$VLLM_PY" --model "$WORK/export" --port 8792 --max-model-len 2048 --gpu-memory-utilization 0.3 >"$WORK/vllm.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 240); do curl -sf http://127.0.0.1:8792/health >/dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:8792/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"model": "radscribe", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}' | head -c 400 | tee -a "$REPORT"; echo
  tail -5 "$WORK/vllm.log" | tee -a "$REPORT"
else
  echo "  vLLM not importable here: skipped (it runs in its own environment: docs/serving.md, --vllm-python)" | tee -a "$REPORT"
fi
echo; echo "wrote $REPORT"
