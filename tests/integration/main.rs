//! Cross-crate integration tests, one binary: determinism (same seed, same bytes, exact
//! resume), bad input (named errors, atomic writes) and the `scoreguide` command. A
//! test of one crate lives in that crate's tests/.

mod bad_input;
mod cli;
mod determinism;
mod kill;
mod readers;
