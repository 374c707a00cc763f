//! The `scoreguide` command's sampling: checkerboard models at scale (in shards and k
//! valid samples: `sample --shard`, `sample --valid`; Gen-neG synthetic sets drawn
//! whole, in shards or by sequential importance sampling: `draws`; `merge`), and image
//! score models.

use crate::run::model_of;
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide::checkerboard::paper_sampler;
use scoreguide::genneg::{
    collect_from, collect_shard, merge_shards, sample_valid, CollectConfig, Shard, ShardDraws,
    Source, Stack, Unconditioned, ValidConfig,
};
use scoreguide::guidance::Score;
use scoreguide::images::{load_image_score, sample_images, save_first_images, ImageScoreConfig};
use scoreguide::oracles::Checkerboard;
use scoreguide::samplers::{initial_noise, Sampler};
use scoreguide::sde::SampleNoise;
use scoreguide::train::{Checkpoint, Progress};
use std::path::{Path, PathBuf};

/// Metadata a shard carries and its merge drops.
const SHARD_KEYS: [&str; 4] = ["shard", "first_row", "rows", "shard_log_weights"];

/// The sampler of `--sampler`: `heun` (the checkerboard paper's, churn 10) or
/// `ancestral` (DDPM's; the one sequential importance sampling needs), on the paper's σ
/// grid of `steps`.
pub fn sampler_of(name: &str, steps: usize) -> Result<(Sampler, Vec<f64>)> {
    let (heun, sigmas) = paper_sampler(steps)?;
    Ok(match name {
        "heun" => (heun, sigmas),
        "ancestral" => (Sampler::DdpmAncestral, sigmas),
        other => bail!("--sampler {other}: expected heun or ancestral"),
    })
}

/// `scoreguide sample` of `n` rows, or of shard `shard`'s batches of them: batch j is
/// rows j·batch … of the whole, row i from noise stream (seed, i), so shards merged
/// are the single run's file byte for byte.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &Path,
    n: usize,
    sampler: &str,
    steps: usize,
    seed: u64,
    batch: usize,
    shard: Option<Shard>,
    out: &Path,
) -> Result<()> {
    if n == 0 || steps == 0 || batch == 0 {
        bail!("scoreguide sample: --n, --steps and --batch must be positive");
    }
    let dev = Device::Cpu;
    let score = model_of(model, &dev)?;
    let (sampler_kind, sigmas) = sampler_of(sampler, steps)?;
    let whole = Shard { index: 0, count: 1 };
    let range = shard.unwrap_or(whole).batches(n.div_ceil(batch));
    let mut progress = Progress::new("sample", range.len() * steps);
    let mut parts = Vec::new();
    for (done, j) in range.clone().enumerate() {
        let (first, b) = (j * batch, batch.min(n - j * batch));
        let mut noise = SampleNoise::new(seed, first, b);
        let x0 = initial_noise(&mut noise, &[b, 2], sigmas[0], DType::F32, &dev)?;
        let mut step = 0;
        let mut cb = |_: &scoreguide::samplers::Step<'_>| {
            step += 1;
            progress.update(done * steps + step, "steps");
            std::ops::ControlFlow::Continue(())
        };
        parts.push(sampler_kind.sample_with(
            score.as_ref(),
            x0,
            &sigmas,
            &scoreguide::guidance::Cond::none(),
            &mut noise,
            Some(&mut cb),
        )?);
    }
    let x = match parts.is_empty() {
        true => Tensor::zeros((0, 2), DType::F32, &dev)?,
        false => Tensor::cat(&parts, 0)?,
    };
    let mut c = Checkpoint::new();
    let rows = x.dim(0)?;
    c.tensors.insert("samples".into(), x);
    c.set_meta("model", &model.display().to_string())?;
    c.set_meta("sampler", &sampler)?;
    c.set_meta("steps", &steps)?;
    c.set_meta("seed", &seed)?;
    c.set_meta("batch", &batch)?;
    if let Some(s) = shard {
        c.set_meta("shard", &s)?;
        c.set_meta("first_row", &(range.start * batch))?;
        c.set_meta("rows", &n)?;
    }
    c.save(out)?;
    match shard {
        Some(s) => println!(
            "shard {}/{}: rows {}..{} of {n} in {}",
            s.index,
            s.count,
            range.start * batch,
            range.start * batch + rows,
            out.display()
        ),
        None => println!("{n} samples of {} in {}", model.display(), out.display()),
    }
    Ok(())
}

/// Whether a checkpoint holds an image score model (`images::train_image_score`
/// records its configuration under `images`).
pub fn is_image_model(c: &Checkpoint) -> bool {
    c.metadata.contains_key("images")
}

/// `scoreguide sample` of an image score model (`c`, read from `model`): `n` images
/// with the model's own sampler (EDM Heun, `steps` or its `sampler_steps`), image i from
/// noise stream (seed, i) as the `image_score` example draws them; `images` in `out`
/// and the first 100 in a PNG grid beside it.
pub fn sample_images_cmd(
    model: &Path,
    c: &Checkpoint,
    n: usize,
    steps: Option<usize>,
    seed: u64,
    out: &Path,
) -> Result<()> {
    if n == 0 || steps == Some(0) {
        bail!("scoreguide sample: --n and --steps must be positive");
    }
    let dev = Device::Cpu;
    let named =
        |e: candle_core::Error| candle_core::Error::msg(format!("{}: {e}", model.display()));
    let mut cfg: ImageScoreConfig = c.meta("images").map_err(named)?;
    if let Some(s) = steps {
        cfg.sampler_steps = s;
    }
    let net = load_image_score(c, &dev).map_err(named)?;
    let mut progress = Progress::new("sample", n);
    let x = sample_images(&cfg, &net, n, seed, &dev, &mut progress)?;
    let mut file = Checkpoint::new();
    file.tensors.insert("images".into(), x.clone());
    file.set_meta("model", &model.display().to_string())?;
    file.set_meta("sampler_steps", &cfg.sampler_steps)?;
    file.set_meta("seed", &seed)?;
    file.save(out)?;
    let png = out.with_extension("png");
    save_first_images(&png, &x, cfg.unet.channels, cfg.unet.size, 100)?;
    println!(
        "{n} images of {} in {} (grid: {})",
        model.display(),
        out.display(),
        png.display()
    );
    Ok(())
}

/// `scoreguide sample --valid K`: K samples the checkerboard oracle calls valid, in
/// batches sized by `genneg::valid_draws`; prints what they cost against the bound the
/// property test checks.
#[allow(clippy::too_many_arguments)]
pub fn sample_valid_cmd(
    model: &Path,
    k: usize,
    delta: f64,
    sampler: &str,
    steps: usize,
    seed: u64,
    batch: usize,
    out: &Path,
    json: bool,
) -> Result<()> {
    let dev = Device::Cpu;
    let score = model_of(model, &dev)?;
    let (sampler_kind, sigmas) = sampler_of(sampler, steps)?;
    let board = Checkerboard::default();
    let cfg = ValidConfig {
        max_batch: batch,
        seed,
        ..ValidConfig::new(k, delta)
    };
    let mut progress = Progress::new("sample --valid", k);
    let s = sample_valid(
        score.as_ref(),
        &sampler_kind,
        &sigmas,
        &Unconditioned(&board),
        &[2],
        &cfg,
        &dev,
        &mut |drawn, valid| progress.update(valid.min(k), &format!("{drawn} drawn")),
    )?;
    let r = &s.report;
    let g_k = r.rows[k - 1] + 1;
    let bound = 2 * g_k + cfg.min_batch;
    let mut c = Checkpoint::new();
    c.tensors.insert("samples".into(), s.x);
    c.set_meta("model", &model.display().to_string())?;
    c.set_meta("sampler", &sampler)?;
    c.set_meta("steps", &steps)?;
    c.set_meta("seed", &seed)?;
    c.set_meta("valid", r)?;
    c.save(out)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "valid": k, "drawn": r.drawn, "batches": r.batches, "sizes": r.sizes,
                "acceptance": r.acceptance(), "ideal": k as f64 / r.acceptance(),
                "overhead": r.overhead(k), "kth_valid_row": g_k, "bound": bound,
                "within_bound": r.drawn <= bound, "delta": delta,
            })
        );
    } else {
        println!("{}", r.summary(k));
        println!(
            "drawn {} ≤ 2·G_k + min_batch = {bound} (G_k = {g_k}, where the {k}-th valid draw fell): {}",
            r.drawn,
            if r.drawn <= bound { "within the bound" } else { "OUTSIDE the bound" }
        );
        println!("{k} valid samples in {}", out.display());
    }
    Ok(())
}

/// The Gen-neG stack in `path` at `gamma` of its guidance ([`Stack::tempered`]).
fn tempered_model_of(path: &Path, gamma: f64, dev: &Device) -> Result<Box<dyn Score>> {
    let named = |e: candle_core::Error| {
        candle_core::Error::msg(format!(
            "--proposal-guidance {gamma} with --model {}: {e}",
            path.display()
        ))
    };
    let c = Checkpoint::load(path)?;
    if !c.metadata.contains_key("classifiers") {
        bail!(
            "--proposal-guidance: {} is a baseline, not a Gen-neG stack: it has no guidance to temper",
            path.display()
        );
    }
    let stack = Stack::from_checkpoint(&c).map_err(named)?;
    Ok(Box::new(
        stack
            .tempered(gamma)
            .map_err(named)?
            .guided(dev)
            .map_err(named)?,
    ))
}

/// What `scoreguide draws` collects.
pub struct DrawsArgs<'a> {
    pub model: &'a Path,
    pub proposal: Option<&'a Path>,
    /// Or `model`'s stack at this fraction of its guidance as the proposal.
    pub proposal_guidance: Option<f64>,
    pub collect: CollectConfig,
    pub sampler: &'a str,
    pub steps: usize,
    pub shard: Option<Shard>,
    pub out: &'a Path,
}

/// `scoreguide draws`: a Gen-neG synthetic set of a checkerboard model (until N valid
/// and N invalid, under a budget), from the model or from `--proposal` by sequential
/// importance sampling; with `--shard i/n` this process's batches of the budget, for
/// `scoreguide merge`.
pub fn draws(a: DrawsArgs) -> Result<()> {
    let dev = Device::Cpu;
    let target = model_of(a.model, &dev)?;
    let proposal = match (a.proposal, a.proposal_guidance) {
        (Some(_), Some(_)) => {
            bail!("scoreguide draws: give --proposal or --proposal-guidance, not both")
        }
        (Some(p), None) => Some(model_of(p, &dev)?),
        (None, Some(gamma)) => Some(tempered_model_of(a.model, gamma, &dev)?),
        (None, None) => None,
    };
    let source = match &proposal {
        Some(p) => Source::Sis {
            target: target.as_ref(),
            proposal: p.as_ref(),
        },
        None => Source::Model(target.as_ref()),
    };
    let (sampler, sigmas) = sampler_of(a.sampler, a.steps)?;
    let board = Checkerboard::default();
    let task = Unconditioned(&board);
    let mut c = match a.shard {
        Some(shard) => {
            let batches = shard
                .batches(a.collect.budget.div_ceil(a.collect.batch))
                .len();
            let mut p = Progress::new(&format!("shard {}/{}", shard.index, shard.count), batches);
            let s = collect_shard(
                source,
                &sampler,
                &sigmas,
                &task,
                &[2],
                &a.collect,
                shard,
                &dev,
                &mut |done, _| p.update(done, "batches"),
            )?;
            println!(
                "shard {}/{}: rows {}..{} of the budget's {}",
                shard.index,
                shard.count,
                s.first_row,
                s.first_row + s.draws.rows(),
                a.collect.budget
            );
            s.to_checkpoint()?
        }
        None => {
            let mut p = Progress::new("draws", a.collect.budget);
            let d = collect_from(
                source,
                &sampler,
                &sigmas,
                &task,
                &[2],
                &a.collect,
                &dev,
                &mut |drawn, v, i| p.update(drawn, &format!("{v} valid, {i} invalid")),
            )?;
            println!("{}", d.summary());
            let mut c = d.to_checkpoint()?;
            c.set_meta("collect", &a.collect)?;
            c
        }
    };
    c.set_meta("model", &a.model.display().to_string())?;
    c.set_meta("proposal", &a.proposal.map(|p| p.display().to_string()))?;
    c.set_meta("proposal_guidance", &a.proposal_guidance)?;
    c.set_meta("sampler", &a.sampler)?;
    c.set_meta("steps", &a.steps)?;
    c.save(a.out)?;
    println!("{}", a.out.display());
    Ok(())
}

/// `scoreguide merge`: shards of one `sample` or `draws` run into the file the single
/// process writes.
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<()> {
    if shards.is_empty() {
        bail!("scoreguide merge: no shard files given");
    }
    let loaded: Vec<Checkpoint> = shards.iter().map(Checkpoint::load).collect::<Result<_>>()?;
    for (c, p) in loaded.iter().zip(shards) {
        if !c.metadata.contains_key("shard") {
            bail!("{}: not a shard (no `shard` metadata)", p.display());
        }
    }
    // What every shard shares (model, sampler, …) goes into the merged file.
    let mut merged = Checkpoint::new();
    for (k, v) in &loaded[0].metadata {
        if !SHARD_KEYS.contains(&k.as_str()) {
            merged.metadata.insert(k.clone(), v.clone());
        }
    }
    let context = |c: &Checkpoint| -> Vec<(String, String)> {
        [
            "model", "proposal", "sampler", "steps", "seed", "batch", "collect", "rows",
        ]
        .iter()
        .filter_map(|k| c.metadata.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect()
    };
    for (c, p) in loaded.iter().zip(shards) {
        if context(c) != context(&loaded[0]) {
            bail!(
                "{}: a shard of another run than {} ({:?} against {:?})",
                p.display(),
                shards[0].display(),
                context(c),
                context(&loaded[0])
            );
        }
    }
    if loaded[0].metadata.contains_key("collect") {
        let parts: Vec<ShardDraws> = loaded
            .iter()
            .zip(shards)
            .map(|(c, p)| {
                ShardDraws::from_checkpoint(c, &Device::Cpu)
                    .map_err(|e| candle_core::Error::msg(format!("{}: {e}", p.display())))
            })
            .collect::<Result<_>>()?;
        let d = merge_shards(&parts, &[2], &Device::Cpu)?;
        println!("{}", d.summary());
        let mut c = d.to_checkpoint()?;
        for (k, v) in &merged.metadata {
            c.metadata.entry(k.clone()).or_insert_with(|| v.clone());
        }
        c.save(out)?;
    } else {
        let tagged: Vec<(Shard, (usize, &Checkpoint, &PathBuf))> = loaded
            .iter()
            .zip(shards)
            .map(|(c, p)| Ok((c.meta("shard")?, (c.meta("first_row")?, c, p))))
            .collect::<Result<_>>()?;
        let count = tagged.len();
        let order = Shard::in_order(tagged)
            .map_err(|e| candle_core::Error::msg(format!("scoreguide merge: {e}")))?;
        let rows: usize = loaded[0].meta("rows")?;
        let mut next = 0;
        let mut parts = Vec::new();
        for (first, c, p) in order {
            let x = c.tensors.get("samples").ok_or_else(|| {
                candle_core::Error::msg(format!("{}: no tensor `samples`", p.display()))
            })?;
            if first != next {
                bail!(
                    "scoreguide merge: {} starts at row {first}, expected row {next}",
                    p.display()
                );
            }
            next += x.dim(0)?;
            parts.push(x.clone());
        }
        if next != rows {
            bail!("scoreguide merge: {next} of {rows} rows");
        }
        merged
            .tensors
            .insert("samples".into(), Tensor::cat(&parts, 0)?);
        merged.save(out)?;
        println!("{rows} samples from {count} shards");
    }
    println!("{}", out.display());
    Ok(())
}
