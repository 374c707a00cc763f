//! Arbitrary bytes into the checkpoint reader and, when they parse, into the model
//! loader: every outcome must be a value or an error, never a panic or an abort.
#![no_main]

use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;
use scoreguide_train::{load_score_model, Checkpoint, Weights};

fuzz_target!(|data: &[u8]| {
    if let Ok(ck) = Checkpoint::from_bytes(data) {
        // Bound the work: a header may legitimately describe a large model.
        if ck.tensors.values().map(|t| t.elem_count()).sum::<usize>() < 1 << 20 {
            let _ = load_score_model(&ck, Weights::Ema, DType::F32, &Device::Cpu);
        }
    }
});
