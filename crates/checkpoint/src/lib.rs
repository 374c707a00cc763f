//! Self-describing safetensors checkpoints, written atomically.
//!
//! A [`Checkpoint`] is named tensors plus string metadata (the JSON of the configurations
//! that built them), stored as one safetensors file that Python's `safetensors` reads
//! too. [`Checkpoint::save`] writes a temporary sibling, fsyncs it and renames it over
//! the target ([`write_atomic`]), so a failed write never damages the previous file;
//! reading never panics on a damaged one. Everything that saves — trainers, data sets,
//! Gen-neG stacks — writes through this crate, which depends on nothing of ours.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use scoreguide_checkpoint::Checkpoint;
//! let mut c = Checkpoint::new();
//! c.set_meta("step", &42u64)?;
//! c.tensors.insert("w".into(), Tensor::new(&[1f32, 2.0], &Device::Cpu)?);
//! let back = Checkpoint::from_bytes(&c.to_bytes()?)?;
//! assert_eq!(back.meta::<u64>("step")?, 42);
//! assert_eq!(back.tensors["w"].to_vec1::<f32>()?, vec![1.0, 2.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Device, Result, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Value of the `format` metadata key of every scoreguide checkpoint.
pub const FORMAT: &str = "scoreguide-checkpoint-v1";

/// Named tensors plus string metadata (JSON values for configurations), stored as one
/// safetensors file that Python's `safetensors` reads too.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    pub fn new() -> Self {
        let mut c = Self::default();
        c.metadata.insert("format".into(), FORMAT.into());
        c
    }

    /// Stores `value` as JSON under `key`.
    pub fn set_meta<T: Serialize>(&mut self, key: &str, value: &T) -> Result<()> {
        let s = serde_json::to_string(value)
            .map_err(|e| candle_core::Error::msg(format!("checkpoint metadata `{key}`: {e}")))?;
        self.metadata.insert(key.into(), s);
        Ok(())
    }

    /// Reads the JSON under `key`.
    pub fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        let Some(s) = self.metadata.get(key) else {
            bail!("checkpoint metadata has no `{key}` entry");
        };
        serde_json::from_str(s).map_err(|e| {
            candle_core::Error::msg(format!("checkpoint metadata `{key}` is not valid: {e}"))
        })
    }

    /// Adds every tensor of `section` under `prefix.` + name.
    pub fn insert_section(&mut self, prefix: &str, section: &BTreeMap<String, Tensor>) {
        for (k, v) in section {
            self.tensors.insert(format!("{prefix}.{k}"), v.clone());
        }
    }

    /// The tensors named `prefix.*`, with the prefix removed.
    pub fn section(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        let p = format!("{prefix}.");
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|k| (k.to_string(), v.clone())))
            .collect()
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let cpu: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        let bytes = safetensors::serialize(cpu.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
            .map_err(|e| candle_core::Error::msg(format!("serialising checkpoint: {e}")))?;
        canonical_header(bytes)
    }

    /// Parses a checkpoint; every failure (truncation, bad header, foreign file) is an
    /// error, never a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
            candle_core::Error::msg(format!(
                "not a readable safetensors file ({e}); truncated or corrupt?"
            ))
        })?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        match metadata.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => bail!("checkpoint format `{f}` is not `{FORMAT}`"),
            None => {
                bail!("safetensors file without `format` metadata: not a scoreguide checkpoint")
            }
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| candle_core::Error::msg(format!("corrupt safetensors data: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| candle_core::Error::msg(format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        Ok(Self { metadata, tensors })
    }

    /// Writes to `path` atomically: a temporary file in the same directory, flushed to
    /// disk, then renamed over `path`. A crash or error mid-write leaves any previous
    /// file at `path` intact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        write_atomic(path, &bytes).map_err(|e| {
            candle_core::Error::msg(format!("writing checkpoint {}: {e}", path.display()))
        })
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| {
            candle_core::Error::msg(format!("reading checkpoint {}: {e}", path.display()))
        })?;
        Self::from_bytes(&bytes)
            .map_err(|e| candle_core::Error::msg(format!("checkpoint {}: {e}", path.display())))
    }
}

/// The same safetensors file with its JSON header's keys sorted: safetensors writes the
/// metadata map in hash order, and equal checkpoints should be equal bytes (a sharded
/// run's merge is checked against a single run's file byte for byte).
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let broken = || candle_core::Error::msg("serialising checkpoint: safetensors wrote no header");
    let len = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(broken)?
            .try_into()
            .map_err(|_| broken())?,
    ) as usize;
    let header = bytes.get(8..8 + len).ok_or_else(broken)?;
    let value: serde_json::Value = serde_json::from_slice(header)
        .map_err(|e| candle_core::Error::msg(format!("serialising checkpoint: header: {e}")))?;
    let mut json = String::with_capacity(len);
    write_sorted(&value, &mut json);
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - len);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
}

fn write_sorted(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                write_sorted(&map[k], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can open a directory.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Metadata through a file and back, as a resumed run reads it.
    fn reread<T: Serialize + DeserializeOwned>(value: &T) -> Result<T> {
        let mut c = Checkpoint::new();
        c.set_meta("value", value)?;
        Checkpoint::from_bytes(&c.to_bytes()?)?.meta("value")
    }

    #[test]
    fn metadata_floats_come_back_to_the_bit() -> Result<()> {
        // The map probe's scale of the traffic full run: serde_json's default parser
        // read it back one ulp off, and resuming that run refused its own checkpoint.
        let scale = 14.817414283752441f64;
        assert_eq!(reread(&scale)?.to_bits(), scale.to_bits());
        Ok(())
    }

    #[test]
    fn equal_checkpoints_are_equal_bytes() -> Result<()> {
        let build = |order: &[usize]| -> Result<Vec<u8>> {
            let mut c = Checkpoint::new();
            for &i in order {
                c.set_meta(&format!("key{i}"), &vec![i as f64 * 0.5; i])?;
                c.tensors
                    .insert(format!("t{i}"), Tensor::new(&[i as f32; 3], &Device::Cpu)?);
            }
            c.to_bytes()
        };
        let a = build(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])?;
        for _ in 0..5 {
            assert_eq!(build(&[9, 3, 0, 7, 1, 5, 2, 8, 6, 4])?, a);
        }
        let back = Checkpoint::from_bytes(&a)?;
        assert_eq!(back.meta::<Vec<f64>>("key3")?, vec![1.5; 3]);
        assert_eq!(back.tensors["t9"].to_vec1::<f32>()?, vec![9.0; 3]);
        Ok(())
    }

    proptest! {
        #[test]
        fn every_finite_f64_survives_metadata(x in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            prop_assert_eq!(reread(&x).unwrap().to_bits(), x.to_bits());
        }
    }
}
