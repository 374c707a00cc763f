//! Arbitrary bytes as a saved traffic scene set.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scoreguide_data::SceneSet::from_bytes(data);
});
