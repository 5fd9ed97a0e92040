# `make demo` and `make test` each create .venv from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum < requirements.txt | cut -d' ' -f1)

# Everything runs offline: no hub downloads, no analytics, wandb without an account.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export WANDB_MODE ?= offline

.PHONY: demo test web api gpu-check clean-demo

# The servers, on the model `make demo` trained (pass other flags with ARGS="--port 8000 ...").
DEMO_MODEL := --ckpt out/demo/128_vlm_sft --vision_model model/clip_model/random-clip-vit-base-patch32-seed0

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -q

web: $(STAMP)
	$(PY) web_server.py $(DEMO_MODEL) $(ARGS)

api: $(STAMP)
	$(PY) serve_openai_api.py $(DEMO_MODEL) $(ARGS)

# The CUDA path (torchrun + nccl, bf16, torch.compile, --resume) and 27M/109M speed on this machine's GPUs
# (GPUS=N picks how many; GPU_CHECK_DEVICE=cpu is a dry run on CPU). See BENCHMARKS.md, "CUDA check".
gpu-check: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean-demo:
	rm -rf dataset/demo dataset/eval_images out/demo model/clip_model/random-clip-vit-base-patch32-seed0
