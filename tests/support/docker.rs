//! Docker fixtures of the integration tests (written with the bollard engine).
