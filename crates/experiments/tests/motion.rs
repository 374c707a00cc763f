//! The motion experiment end to end at toy sizes: the task labels what the oracle says,
//! every stage runs and is reused, and the table's rows are what the issue names.

use candle_core::{Device, Tensor};
use scoreguide_experiments::config::{resolve, Preset};
use scoreguide_experiments::motion::stages::Run;
use scoreguide_experiments::motion::{MotionData, MotionRunConfig, MotionTask};
use scoreguide_genneg::Task;
use scoreguide_oracles::motion::{FEATURES, ROOT_Y};

fn tiny() -> MotionRunConfig {
    let sets = [
        "data.frames=12",
        "data.min_frames=8",
        "data.train=80",
        "data.test=24",
        "model.net.frames=12",
        "model.net.hidden=32",
        "model.net.blocks=1",
        "model.diffusion_steps=50",
        "model.iters=60",
        "model.save_every=30",
        "sampler.steps=6",
        "genneg.per_class=10",
        "genneg.budget=60",
        "genneg.classifier_iters=20",
        "genneg.distill_iters=10",
        "encoder.iters=30",
        "eval.samples=24",
        "eval.seeds=2",
        "eval.r_elbo_draws=1",
        "eval.sampler_comparison.samples=8",
        "eval.sampler_comparison.ddpm_steps=20",
    ]
    .map(String::from);
    resolve(true, None, &sets).unwrap()
}

#[test]
fn the_task_labels_what_the_oracle_sees() {
    let cfg = tiny();
    let (train, _) = MotionData::load(&cfg, 0, &Device::Cpu).unwrap();
    let task = MotionTask {
        data: &train,
        oracle: cfg.oracle(),
    };
    let keys = [0u32, 1, 2];
    let x = train.rows(&keys).unwrap();
    assert_eq!(task.label(&x, &keys).unwrap(), vec![true; 3]);
    // Motion 1's root 10 cm under the ground in its first frame: that motion infracts.
    let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let d = train.set.row_dim();
    v[d + ROOT_Y] -= (train.set.motion(1)[ROOT_Y] + 0.1) / train.norm.std[ROOT_Y];
    let x = Tensor::from_vec(v, (3, d), &Device::Cpu).unwrap();
    assert_eq!(task.label(&x, &keys).unwrap(), vec![true, false, true]);
    // Padding is never judged: garbage past a motion's length changes nothing.
    let len = train.set.lengths[2];
    if len < train.set.frames {
        let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        v[2 * d + len * FEATURES + ROOT_Y] = -1e3;
        let x = Tensor::from_vec(v, (3, d), &Device::Cpu).unwrap();
        assert_eq!(task.label(&x, &keys).unwrap(), vec![true, false, true]);
    }
    let cond = task.cond(&keys).unwrap();
    assert_eq!(cond.mask.unwrap().dims(), &[3, train.set.frames]);
}

#[test]
fn a_tiny_run_goes_through_every_stage_and_is_reused() {
    let out = std::env::temp_dir().join(format!("sg-motion-{}", std::process::id()));
    std::fs::remove_dir_all(&out).ok();
    let run = |reuse| Run {
        cfg: tiny(),
        out: out.clone(),
        dev: Device::Cpu,
        seed: 3,
        reuse,
    };
    let go = |run: &Run| {
        let o = run.run_all().unwrap();
        let samplers = run
            .compare_samplers(&o.test, &o.encoder, &o.models)
            .unwrap();
        let names: Vec<String> = samplers
            .iter()
            .map(|r| format!("{} {}", r.model, r.sampler))
            .collect();
        assert_eq!(
            names,
            [
                "baseline heun-6",
                "baseline ddpm-20",
                "genneg_1 heun-6",
                "genneg_1 ddpm-20"
            ]
        );
        assert!(samplers.iter().all(|r| r.samples == 8 && r.fid.is_finite()));
        o.rows
    };
    let rows = go(&run(false));
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "genneg_1",
            "wo_is",
            "imbalanced",
            "time_independent",
            "distilled"
        ]
    );
    for r in &rows {
        assert!((0.0..=1.0).contains(&r.infraction_rate), "{r:?}");
        assert!(r.infraction_per_frame <= r.infraction_rate + 1e-12);
        assert!(
            r.fid.is_finite() && r.kid.is_finite() && r.r_elbo < 0.0,
            "{r:?}"
        );
        assert_eq!(r.seeds.len(), 2);
    }
    assert!(out.join("motions.png").exists());
    let stamp = |f: &str| std::fs::metadata(out.join(f)).unwrap().modified().unwrap();
    let before = (
        stamp("baseline.safetensors"),
        stamp("classifier_wo_is.safetensors"),
    );
    let again = go(&run(true));
    assert_eq!(again, rows);
    assert_eq!(
        before,
        (
            stamp("baseline.safetensors"),
            stamp("classifier_wo_is.safetensors")
        )
    );
    // The baseline check: where the noise outweighs the data (σ > 1), even this
    // barely trained denoiser is closer to the clean motions than its noisy input; the
    // sampler rows are the comparison's baseline rows.
    let r = run(true);
    let (train, test) = r.data().unwrap();
    let base = r.baseline(&train).unwrap();
    let profile = r.denoise_profile(&test, &base, 16).unwrap();
    assert_eq!(profile.len(), 8);
    assert!(profile.iter().any(|[_, sigma, _, _]| *sigma < 1.0));
    for [t, sigma, d, x] in profile.iter().filter(|p| p[1] > 1.0) {
        assert!(d < x && d.is_finite(), "t {t}, σ {sigma}: {d} vs {x}");
    }
    let encoder = r.encoder(&train, &test).unwrap();
    let check = r.check_baseline(&test, &encoder, &base).unwrap();
    let names: Vec<String> = check
        .iter()
        .map(|r| format!("{} {}", r.model, r.sampler))
        .collect();
    assert_eq!(names, ["baseline heun-6", "baseline ddpm-20"]);
    // A kept model of another configuration is refused, naming what differs.
    let mut other = run(true);
    other.cfg.model.net.hidden = 16;
    let (train, _) = other.data().unwrap();
    let e = other.baseline(&train).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn presets_validate() {
    MotionRunConfig::quick().validate().unwrap();
    MotionRunConfig::full().validate().unwrap();
    let e = resolve::<MotionRunConfig>(true, None, &["model.net.frames=30".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.frames"), "{e}");
}

/// A distilled student learns the teacher where the sampler goes: the full preset's
/// Heun sampler starts at σ = 80, so distillation draws no noise level above it (the
/// DDPM grid itself reaches σ ≈ 2·10⁴); DDPM's ancestral sampler visits every level.
#[test]
fn distillation_draws_the_noise_levels_the_sampler_visits() {
    use scoreguide_experiments::motion::MotionSampler;
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let heun = MotionRunConfig::full();
    let top = heun.sampler().unwrap().1[0];
    assert!((top - 80.0).abs() < 1e-9, "{top}");
    let drawn = heun
        .distillation()
        .unwrap()
        .sigma
        .sample_n(20_000, &mut rng);
    let max = drawn.iter().cloned().fold(0.0, f64::max);
    assert!(
        max <= 80.0 * (1.0 + 1e-9) && max > 60.0,
        "largest σ drawn {max}"
    );
    let ddpm = MotionRunConfig {
        sampler: MotionSampler::Ddpm { steps: 1000 },
        ..MotionRunConfig::full()
    };
    let drawn = ddpm
        .distillation()
        .unwrap()
        .sigma
        .sample_n(20_000, &mut rng);
    let max = drawn.iter().cloned().fold(0.0, f64::max);
    assert!(max > 1000.0, "largest σ drawn {max}");
}
