# clawfleet — common tasks. `make help` lists them.

CARGO ?= cargo
AGENT_IMAGE ?= clawfleet-agent-stub:dev
# The PostgreSQL server the tests create their throwaway databases on (.ci/run sets one up).
CLAWFLEET_TEST_PG_URL ?= postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres
export CLAWFLEET_TEST_PG_URL

.PHONY: help build test lint fmt agent-image run bench clean

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

run: build ## Run the controller on the embedded defaults (SQLite under ./data)
	./target/release/clawfleet run

clean: ## Remove build output
	$(CARGO) clean
