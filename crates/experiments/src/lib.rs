//! The papers' experiments, each a composition of the scoreguide crates with a
//! configuration: what is an experiment's own (its data, networks' settings, metrics and
//! pictures) lives here; sampling, guidance, losses, training and Gen-neG are the
//! crates'. The examples (`examples/<name>.rs`) are thin mains over these modules.
//!
//! * [`checkerboard`]: Gen-neG §4.1's baseline (data, training, the paper's sampler,
//!   the scatter plot).
//! * [`moons`]: DLSM §3 on two moons (score model, CE / DLSM / total classifiers,
//!   Parzen references).
//! * [`dlsm_images`]: DLSM §5 on images (guidance classifiers trained with CE or
//!   DLSM on a frozen U-Net, class-conditional samples, Table 2's metrics).
//! * [`images`]: image score models (a U-Net on Fashion-MNIST or CIFAR with DSM, in
//!   resumable stages; EDM's Heun sampler; image grids).
//! * [`motion`]: Gen-neG §4.3 on procedural human motions (MDM-style baseline, the
//!   ground-penetration task, the motion encoder of FID/KID, stick-figure strips).
//! * [`traffic`]: Gen-neG §4.2 on procedural traffic scenes, split by stage: `config`,
//!   `data`, `model`, `genneg` (the scenes as a [`scoreguide_genneg::Task`]), `eval`,
//!   `render`.
//! * [`config`]: every experiment's configuration as a serde struct with quick and full
//!   presets, read from TOML or JSON files with `--set` overrides.
//! * [`plot`]: PNG canvases and charts; [`runtime`]: the examples' common flags,
//!   devices, threads, JSON output and timing.
//!
//! ```
//! use scoreguide_experiments::checkerboard::{paper_sampler, BaselineConfig};
//! let cfg = BaselineConfig::default();
//! assert_eq!((cfg.train_points, cfg.iters), (1000, 30_000)); // the paper's (App. B.1)
//! let (_, sigmas) = paper_sampler(100)?;
//! assert_eq!(sigmas.len(), 101); // 100 Heun steps down to σ = 0
//! # Ok::<(), candle_core::Error>(())
//! ```

pub mod checkerboard;
pub mod config;
pub mod dlsm_images;
pub mod image_metrics;
pub mod images;
pub mod moons;
pub mod motion;
pub mod plot;
pub mod runtime;
pub mod traffic;
