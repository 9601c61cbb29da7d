# unmask developer tasks. `make install` then `make demo` (main job) or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install test test-all lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e '.[dev]'

# pytest exit code 5 ("no tests collected") is turned into a failure: it must never pass silently.
test:
	$(BIN)/python -m pytest -m 'not slow'; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ]

test-all:
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ]

lint:
	$(BIN)/ruff check unmask_cli tests benchmarks

# The main job, offline on the built-in sample portraits: first the shipped model unmasks masked sample
# photos (seconds), then the training demo: prepare -> train (quick) -> eval -> infer.
# Random VGG features are an explicit opt-in here (no network for ImageNet weights); every report says so.
demo:
	$(BIN)/python -m unmask_cli.demo $(DEMO)/photos 4
	$(BIN)/unmask infer $(DEMO)/photos $(DEMO)/shipped --compare
	@echo "shipped model: $(DEMO)/shipped/ (input | output side by side in $(DEMO)/shipped/compare/); now the training demo"
	$(BIN)/unmask prepare --out $(DEMO)/data --num-samples 320 --size 128 --workers 2 \
		--mask-types surgical:2,n95,kn95,cloth:2,rect,oval
	$(BIN)/unmask train --config configs/quick.yaml --data $(DEMO)/data --runs $(DEMO)/runs --name quick \
		--set loss.vgg_weights=random
	$(BIN)/unmask eval --checkpoint $(DEMO)/runs/quick/best.pt --data $(DEMO)/data --split test --out $(DEMO)/eval
	$(BIN)/unmask infer $(DEMO)/photos $(DEMO)/unmasked --checkpoint $(DEMO)/runs/quick/best.pt \
		--masks $(DEMO)/photos/masks --compare
	@echo
	@echo "demo done:"
	@echo "  shipped model    : $(DEMO)/shipped/compare/ (masked | unmasked, no training needed)"
	@echo "  training samples : $(DEMO)/runs/quick/samples/ (masked | output | original per epoch)"
	@echo "  training curves  : $(DEMO)/runs/quick/curves.png (every loss, validation PSNR/SSIM/IoU, img/s)"
	@echo "  metrics table    : $(DEMO)/eval/metrics.json, $(DEMO)/eval/per_image.csv"
	@echo "  comparison sheet : $(DEMO)/eval/comparison.png"
	@echo "  unmasked photos  : $(DEMO)/unmasked/ (side by side in $(DEMO)/unmasked/compare/)"

bench:
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf $(DEMO) .pytest_cache
