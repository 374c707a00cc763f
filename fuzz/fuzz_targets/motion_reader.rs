//! Arbitrary bytes as one of HumanML3D's motion files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scoreguide_data::motion::{humanml3d_motion, MotionConfig};

fuzz_target!(|data: &[u8]| {
    let cfg = MotionConfig {
        frames: 60,
        min_frames: 2,
    };
    let _ = humanml3d_motion(data, "motion.npy", &cfg);
});
