//! Arbitrary bytes as MNIST-format IDX files (images and labels) and CIFAR batches.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scoreguide_data::parse_idx(data, 3, "images");
    let _ = scoreguide_data::parse_idx(data, 1, "labels");
    let _ = scoreguide_data::parse_cifar(data, 1, "batch");
});
