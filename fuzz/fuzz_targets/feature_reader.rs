//! Arbitrary bytes into the feature reader of `scoreguide metrics` (`.npy`, or
//! safetensors of one tensor).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scoreguide_metrics::parse_feature_rows(data);
});
