//! Cross-crate integration tests, one binary: determinism (same seed, same bytes, exact
//! resume), bad input (named errors, atomic writes) and the `scoreguide` command. A
//! test of one crate lives in that crate's tests/.

mod bad_input;
mod cli;
mod determinism;
mod kill;
mod readers;

/// Whether Fashion-MNIST is installed for the tests that train on it; where it is not,
/// they skip (saying why), unless `SCOREGUIDE_REQUIRE_DATA=1` (as in CI) makes that a
/// failure.
fn fashion_mnist_installed() -> bool {
    use scoreguide::data::{fashion_mnist, ImageSplit};
    match fashion_mnist(None, ImageSplit::Test) {
        Ok(_) => true,
        Err(e) if std::env::var("SCOREGUIDE_REQUIRE_DATA").is_ok_and(|v| v == "1") => {
            panic!("SCOREGUIDE_REQUIRE_DATA=1 but {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}
