//! Arbitrary bytes into the `.npy` readers (2-D and 1-D): a value or an error, never a
//! panic, an abort or a runaway allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scoreguide_metrics::read_npy(data);
    let _ = scoreguide_metrics::read_npy_vector(data);
});
