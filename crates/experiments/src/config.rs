//! Experiment configurations: presets, files and `--set` overrides.
//!
//! Each experiment's configuration is a plain serde struct with a `quick` preset (a check
//! in minutes) and a `full` one (the run behind the documented table) ([`Preset`]). A
//! run starts from a preset (`--quick`, or the file's `preset = "quick"` key; full
//! otherwise), lays a TOML or JSON file over it (complete or partial: the file's keys
//! replace the preset's), then `--set key.path=value` overrides, and checks the result;
//! every key must be one the configuration has, so a typo is an error that names it;
//! `"none"` switches an optional setting off (TOML has no null). The
//! resolved configuration is written beside the run's outputs as JSON
//! ([`save_resolved`]; exact, absent values included), and `--config` with it and the
//! run's `--seed` reruns it (the seed is always the command line's: an experiment sets
//! its configuration's seeds from it).
//!
//! ```
//! use scoreguide_experiments::config::{resolve, Preset};
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Run { iters: u64, sampler: Sampler }
//! #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
//! struct Sampler { steps: usize, churn: f64 }
//! impl Preset for Run {
//!     fn quick() -> Self { Run { iters: 10, sampler: Sampler { steps: 8, churn: 0.0 } } }
//!     fn full() -> Self { Run { iters: 1000, sampler: Sampler { steps: 64, churn: 0.0 } } }
//! }
//! let run: Run = resolve(true, None, &["sampler.churn=10".into(), "iters=20".into()])?;
//! assert_eq!(run, Run { iters: 20, sampler: Sampler { steps: 8, churn: 10.0 } });
//! let typo = resolve::<Run>(false, None, &["sampler.stpes=3".into()]).unwrap_err();
//! assert!(typo.to_string().contains("sampler.stpes"));
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{bail, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// An experiment configuration with its two presets.
pub trait Preset: Serialize + DeserializeOwned {
    /// A check of the whole pipeline in minutes on 2 cores (not a result).
    fn quick() -> Self;
    /// The run behind the documented table.
    fn full() -> Self;
    /// Checks the values once they are all in (ranges, consistency).
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// How a run's configuration is chosen: `#[command(flatten)]` it into an example's flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Start from the quick preset (a check in minutes) instead of the full run's.
    #[arg(long)]
    pub quick: bool,
    /// A configuration file (TOML, or JSON by extension), complete or partial: its keys
    /// replace the preset's. Checked-in ones are in `configs/<experiment>/`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set genneg.draws=2000` (the value as JSON, else as a
    /// string); repeatable, applied after the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The preset, overlaid with the file and the overrides, validated.
    pub fn resolve<T: Preset>(&self) -> Result<T> {
        resolve(self.quick, self.config.as_deref(), &self.set)
    }
}

/// The quick or full preset, with `file` laid over it and then each `KEY=VALUE` of
/// `sets`, deserialised and validated. Errors name the file, key or value at fault.
pub fn resolve<T: Preset>(quick: bool, file: Option<&Path>, sets: &[String]) -> Result<T> {
    let text = match file {
        Some(path) => Some((
            std::fs::read_to_string(path)
                .map_err(|e| candle_core::Error::msg(format!("config {}: {e}", path.display())))?,
            path,
        )),
        None => None,
    };
    resolve_text(quick, text.as_ref().map(|(t, p)| (t.as_str(), *p)), sets)
}

/// [`resolve`] on a configuration file's text (`path` names it and says its format:
/// JSON by extension, TOML otherwise).
pub fn resolve_text<T: Preset>(
    quick: bool,
    file: Option<(&str, &Path)>,
    sets: &[String],
) -> Result<T> {
    let mut layer = None;
    let mut quick = quick;
    if let Some((text, path)) = file {
        let mut v = parse_file(text, path)?;
        if let Some(p) = v.as_object_mut().and_then(|m| m.remove(PRESET_KEY)) {
            quick = match p.as_str() {
                Some("quick") => true,
                Some("full") if !quick => false,
                Some("full") => bail!(
                    "config {}: says preset = \"full\" but --quick was given",
                    path.display()
                ),
                _ => bail!(
                    "config {}: `{PRESET_KEY}` must be \"quick\" or \"full\", got {p}",
                    path.display()
                ),
            };
        }
        layer = Some((v, path));
    }
    let preset = if quick { T::quick() } else { T::full() };
    let mut value = serde_json::to_value(&preset).map_err(candle_core::Error::wrap)?;
    if let Some((v, path)) = layer {
        merge(&mut value, v, "", path)?;
    }
    for s in sets {
        let Some((key, raw)) = s.split_once('=') else {
            bail!("--set {s:?}: expected KEY=VALUE");
        };
        let parsed = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
        set_path(&mut value, key.trim(), parsed)?;
    }
    // Name what the values came from: the file and the overrides.
    let source = match (file.map(|(_, p)| p), sets.is_empty()) {
        (Some(p), true) => format!("config {}", p.display()),
        (Some(p), false) => format!("config {} with --set {}", p.display(), sets.join(" ")),
        (None, false) => format!("configuration with --set {}", sets.join(" ")),
        (None, true) => "configuration".to_string(),
    };
    let cfg: T = serde_json::from_value(value)
        .map_err(|e| candle_core::Error::msg(format!("{source}: {e}")))?;
    cfg.validate()
        .map_err(|e| candle_core::Error::msg(format!("{source}: {e}")))?;
    Ok(cfg)
}

/// A configuration file's contents as JSON values: TOML unless the name ends in `.json`.
fn parse_file(text: &str, path: &Path) -> Result<Value> {
    let what = |e: &dyn std::fmt::Display| {
        candle_core::Error::msg(format!("config {}: {e}", path.display()))
    };
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| what(&e))
    } else {
        let t: toml::Value = toml::from_str(text).map_err(|e| what(&e))?;
        serde_json::to_value(t).map_err(|e| what(&e))
    }
}

/// Lays `layer` over `base`: objects merge key by key (every key must exist in `base`),
/// anything else replaces. `at` is the key path so far, for errors.
fn merge(base: &mut Value, layer: Value, at: &str, file: &Path) -> Result<()> {
    match (base, layer) {
        // Another network (`arch`, the tag of every network configuration) has other
        // keys: the layer's table replaces the preset's whole.
        (slot @ Value::Object(_), Value::Object(l)) if changes_variant(slot, &l) => {
            *slot = Value::Object(l);
            Ok(())
        }
        (Value::Object(b), Value::Object(l)) => {
            for (k, v) in l {
                let key = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v, &key, file)?,
                    None => bail!(
                        "config {}: unknown key `{key}` (known here: {})",
                        file.display(),
                        b.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                }
            }
            Ok(())
        }
        (slot, v) => {
            *slot = absent_if_none(slot, v);
            Ok(())
        }
    }
}

/// Whether `layer` names a network architecture other than the one in `base`.
fn changes_variant(base: &Value, layer: &serde_json::Map<String, Value>) -> bool {
    matches!((base.get("arch"), layer.get("arch")), (Some(a), Some(b)) if a != b)
}

/// TOML has no null: the string `"none"` in place of a value that is not a string
/// means absent (an optional setting switched off, e.g. `distill = "none"`).
fn absent_if_none(slot: &Value, v: Value) -> Value {
    match (&v, slot) {
        (Value::String(s), old) if s == "none" && !old.is_string() => Value::Null,
        _ => v,
    }
}

/// Sets `key` (dot-separated) in `value` to `new`; every segment but those below a
/// non-object value must exist.
fn set_path(value: &mut Value, key: &str, new: Value) -> Result<()> {
    let mut slot = value;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let Value::Object(map) = slot else {
            bail!(
                "--set {key}: `{}` is not a table of keys",
                parts[..i].join(".")
            );
        };
        let known = map.keys().cloned().collect::<Vec<_>>().join(", ");
        slot = match map.get_mut(*part) {
            Some(s) => s,
            None => bail!("--set {key}: unknown key `{part}` (known here: {known})"),
        };
    }
    *slot = absent_if_none(slot, new);
    Ok(())
}

/// The top-level key of a configuration file that names the preset it is laid over.
pub const PRESET_KEY: &str = "preset";

/// Writes `cfg` as `dir/config.json` (atomically): `--config` on it, with the same
/// `--seed`, reruns this run.
pub fn save_resolved<T: Serialize>(cfg: &T, dir: &Path) -> Result<PathBuf> {
    let path = dir.join("config.json");
    crate::runtime::write_json(&path, cfg)?;
    Ok(path)
}

/// A preset as the TOML file checked in for it (`configs/<experiment>/<name>.toml`): its
/// `preset` key first, then every value. Absent optional values are left out (TOML has
/// no null), which reads back as the same preset's.
pub fn preset_toml<T: Preset>(name: &str) -> Result<String> {
    let cfg = match name {
        "quick" => T::quick(),
        "full" => T::full(),
        _ => bail!("preset must be quick or full, got {name:?}"),
    };
    let mut v = serde_json::to_value(&cfg).map_err(candle_core::Error::wrap)?;
    drop_nulls(&mut v);
    let body =
        toml::to_string_pretty(&v).map_err(|e| candle_core::Error::msg(format!("TOML: {e}")))?;
    Ok(format!("{PRESET_KEY} = \"{name}\"\n{body}"))
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}
