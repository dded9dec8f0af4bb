.PHONY: setup test lint main
setup:
	bash scripts/setup.sh
test:
	bash scripts/test.sh
lint:
	.venv/bin/ruff check medpretrain pretrain finetune generative scripts benchmarks tests
	.venv/bin/mypy
main:
	bash scripts/main.sh
