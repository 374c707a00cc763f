//! Arbitrary text as a configuration file, TOML and JSON, resolved over both presets of
//! an experiment's configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scoreguide_experiments::config::resolve_text;
use scoreguide_experiments::motion::MotionRunConfig;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (name, quick) in [("c.toml", true), ("c.json", false)] {
        let _ = resolve_text::<MotionRunConfig>(quick, Some((text, Path::new(name))), &[]);
    }
});
