//! Where a traffic score model loses precision. Held-out scenes are noised at σ and
//! denoised in one step, x̂0 = D(x0 + σz; σ); per σ the example prints the position
//! error of the noisy input and of x̂0 (RMS, metres), x̂0's heading error, and the
//! collision / offroad / infraction rates of the noisy scenes and of the x̂0 scenes (the
//! data's are 0). Sampling ends with such a step at the grid's smallest σ, so a model
//! whose x̂0 infracts at small σ cannot sample valid scenes, whatever its large-σ
//! behaviour; one whose x̂0 is clean at small σ but whose samples infract fails earlier
//! in the chain.
//!
//! ```text
//! cargo run --release --example traffic_denoise -- out/genneg_traffic/baseline.safetensors out/genneg_traffic/scenes_test.safetensors
//! ```

use candle_core::{DType, Tensor};
use clap::Parser;
use scoreguide::data::SceneSet;
use scoreguide::guidance::Score;
use scoreguide::oracles::scene::VEHICLE_FEATURES;
use scoreguide::runtime::{write_json, CommonArgs};
use scoreguide::sde::randn;
use scoreguide::traffic::{label_scenes, SceneRates, TrafficData, TrafficModel};
use scoreguide::train::Checkpoint;
use serde::Serialize;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "One-step denoising error of a traffic score model, per noise level")]
struct Args {
    /// A traffic model checkpoint (`genneg_traffic`'s baseline.safetensors or distilled.safetensors).
    model: PathBuf,
    /// Held-out scenes (`genneg_traffic`'s scenes_test.safetensors).
    scenes: PathBuf,
    /// Noise levels, in the model's standardised units.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.005,0.01,0.02,0.05,0.1,0.2,0.5,1"
    )]
    sigmas: Vec<f64>,
    /// Scenes used (the first N of the file).
    #[arg(long, default_value_t = 500)]
    n: usize,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Serialize)]
struct Level {
    sigma: f64,
    noisy_position_rms_m: f64,
    denoised_position_rms_m: f64,
    denoised_heading_rms_deg: f64,
    noisy: SceneRates,
    denoised: SceneRates,
}

/// RMS over vehicles of the position error (metres) and of the heading error (degrees)
/// of `a` against `b`, both `[n · A · 7]` in metres.
fn errors(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut pos, mut head, mut n) = (0.0, 0.0, 0.0);
    for (u, v) in a
        .chunks_exact(VEHICLE_FEATURES)
        .zip(b.chunks_exact(VEHICLE_FEATURES))
    {
        pos += ((u[0] - v[0]) as f64).powi(2) + ((u[1] - v[1]) as f64).powi(2);
        let d = (u[5] as f64).atan2(u[4] as f64) - (v[5] as f64).atan2(v[4] as f64);
        let d = (d + std::f64::consts::PI).rem_euclid(2.0 * std::f64::consts::PI)
            - std::f64::consts::PI;
        head += d.to_degrees().powi(2);
        n += 1.0;
    }
    ((pos / n).sqrt(), (head / n).sqrt())
}

fn main() -> candle_core::Result<()> {
    let args = Args::parse();
    scoreguide::runtime::on_compute_threads(args.common.threads, || run(args))
}

fn run(args: Args) -> candle_core::Result<()> {
    let dev = args.common.setup()?;
    let model = TrafficModel::load(&Checkpoint::load(&args.model)?, DType::F32, &dev)?;
    let set = SceneSet::load(&args.scenes)?;
    if set.is_empty() {
        candle_core::bail!("{}: no scenes", args.scenes.display());
    }
    if let Some(bad) = args.sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        candle_core::bail!("--sigmas: {bad} is not a positive noise level");
    }
    let data = TrafficData::new(set, model.scaler.clone(), &model.config, &dev)?;
    let n = args.n.min(data.set.len());
    let idx: Vec<u32> = (0..n as u32).collect();
    let clean_m = model
        .scaler
        .denormalize(&data.x.rows(&idx)?.flatten_all()?.to_vec1::<f32>()?);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(args.common.seed);
    let mut levels = Vec::new();
    let score = model.stack().guided(&dev)?;
    println!("| σ | noisy position RMS (m) | x̂0 position RMS (m) | x̂0 heading RMS (°) | noisy collision / offroad / infraction % | x̂0 collision / offroad / infraction % |");
    println!("|---|---|---|---|---|---|");
    for &sigma in &args.sigmas {
        let (mut noisy, mut denoised) = (Vec::new(), Vec::new());
        for chunk in idx.chunks(250) {
            let x0 = data.x.rows(chunk)?;
            let x = (&x0 + (randn(&mut rng, x0.dims(), &dev)? * sigma)?)?;
            let s = Tensor::full(sigma as f32, chunk.len(), &dev)?;
            let d = score.denoise_with(&x, &s, &data.cond_of(chunk)?)?;
            noisy.extend(
                model
                    .scaler
                    .denormalize(&x.flatten_all()?.to_vec1::<f32>()?),
            );
            denoised.extend(
                model
                    .scaler
                    .denormalize(&d.flatten_all()?.to_vec1::<f32>()?),
            );
        }
        let (noisy_rates, _) = label_scenes(&data, &idx, &noisy)?;
        let (denoised_rates, _) = label_scenes(&data, &idx, &denoised)?;
        let (noisy_pos, _) = errors(&noisy, &clean_m);
        let (den_pos, den_head) = errors(&denoised, &clean_m);
        let pct = |r: &SceneRates| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                100.0 * r.collision,
                100.0 * r.offroad,
                100.0 * r.infraction
            )
        };
        println!(
            "| {sigma} | {noisy_pos:.3} | {den_pos:.3} | {den_head:.2} | {} | {} |",
            pct(&noisy_rates),
            pct(&denoised_rates)
        );
        levels.push(Level {
            sigma,
            noisy_position_rms_m: noisy_pos,
            denoised_position_rms_m: den_pos,
            denoised_heading_rms_deg: den_head,
            noisy: noisy_rates,
            denoised: denoised_rates,
        });
    }
    if let Some(p) = &args.common.json {
        write_json(p, &levels)?;
    }
    Ok(())
}
