//! Run set-up shared by the examples and the `scoreguide` command.

use candle_core::{bail, Device, Result};
use serde::Serialize;
use std::path::Path;

/// Threads used when neither `--threads` nor `RAYON_NUM_THREADS` says otherwise: every
/// available core. On 2 cores, 2 threads beat 1 for the checkerboard network by 10% per
/// training step and about 30% per sampling step (docs/PERFORMANCE.md).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets the CPU thread count (candle reads `RAYON_NUM_THREADS` on every op, rayon at
/// pool start): `threads` if given, else the environment, else [`default_threads`].
/// Call first thing in `main`, before any tensor work. Returns the count in force.
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
        })
        .filter(|n| *n > 0)
        .unwrap_or_else(default_threads);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| {
                    candle_core::Error::msg(format!("--device {s}: bad GPU ordinal"))
                })?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support; rebuild with `--features cuda`"
                );
            }
            Device::new_cuda(ordinal)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Writes `value` as pretty JSON to `path` atomically, creating the parent directory.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    ensure_parent(path)?;
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| candle_core::Error::msg(format!("JSON for {}: {e}", path.display())))?;
    scoreguide_train::write_atomic(path, format!("{s}\n").as_bytes())
        .map_err(|e| candle_core::Error::msg(format!("writing {}: {e}", path.display())))
}

/// Creates the parent directory of `path` if needed.
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        if !p.as_os_str().is_empty() {
            std::fs::create_dir_all(p)
                .map_err(|e| candle_core::Error::msg(format!("creating {}: {e}", p.display())))?;
        }
    }
    Ok(())
}
