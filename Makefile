# `make test` and `make demo` create the environment first when it is missing
# (tools/setup_env.sh: apt packages when root, .venv, the pinned requirements.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
# numba's TBB layer prints "Unable to join threads" at fork once ffcv has run; omp is as fast.
export NUMBA_THREADING_LAYER := omp
export PYTHONUNBUFFERED := 1
DEMO_DATA := data/synthetic_train.beton data/synthetic_test.beton

.PHONY: setup test demo clean

setup: $(VENV)/.complete

$(VENV)/.complete: requirements.txt pyproject.toml tools/setup_env.sh
	VENV=$(VENV) bash tools/setup_env.sh

# Two workers, one test file each at a time (module fixtures are built once); the slowest tests are listed.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

$(DEMO_DATA): | setup
	$(PY) data_prep/write_beton.py --data.dataset=synthetic --data.out_dir=data

demo: setup $(DEMO_DATA)
	$(PY) data_prep/inspect_beton.py $(DEMO_DATA)
	$(PY) train/pretrain.py -C configs/demo.yaml
	$(PY) eval/knn.py -C configs/demo.yaml
	$(PY) eval/knn.py -C configs/demo.yaml --eval.checkpoint=random --eval.out=runs/demo_random/eval_knn.json
	$(PY) eval/linear.py -C configs/demo.yaml
	$(PY) eval/linear.py -C configs/demo.yaml --eval.checkpoint=random --eval.out=runs/demo_random/eval_linear_cached.json
	$(PY) eval/report.py runs/demo --baseline runs/demo_random

clean:
	rm -rf runs/demo runs/demo_random
