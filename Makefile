# clawfleet — common tasks. `make help` lists them.

CARGO ?= cargo
AGENT_IMAGE ?= clawfleet-agent-stub:dev
# The PostgreSQL server the tests create their throwaway databases on (.ci/run sets one up).
CLAWFLEET_TEST_PG_URL ?= postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres
export CLAWFLEET_TEST_PG_URL

.PHONY: help build test lint fmt agent-image run demo demo-stop bench clean image deploy-check test-deploy

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## Build clawfleet (release)
	$(CARGO) build --release --bin clawfleet

test: agent-image ## Run every test (needs Docker and the test PostgreSQL; see .ci/run)
	$(CARGO) nextest run --workspace --no-fail-fast

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## Format the code
	$(CARGO) fmt --all

agent-image: ## Build the test agent image clawfleet-agent-stub:dev (FROM scratch)
	IMAGE=$(AGENT_IMAGE) bash agent-stub/build-image.sh

bench: agent-image ## Convergence and resync benchmark; prints a table and a summary line
	$(CARGO) bench --bench converge

run: build ## Run the controller on the embedded defaults (SQLite under ./data; creates a key if none)
	./target/release/clawfleet run

demo: build agent-image ## Start clawfleet on the stand-in agent image, create users, watch them converge
	bash scripts/demo.sh

demo-stop: ## Stop the demo controller and remove the demo's containers
	bash scripts/demo-stop.sh

clean: ## Remove build output
	$(CARGO) clean
