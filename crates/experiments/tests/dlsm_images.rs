//! DLSM's image classifiers on a two-class Gaussian mixture of 4 × 4 images, whose
//! prior and likelihood scores are known at every σ: trained on the exact prior, the
//! DLSM classifier's ∇x log p(y | x; σ) approaches the true likelihood score (closer than
//! at initialisation and than the cross-entropy classifier's), its guided samples land in
//! the class asked for, and the report's mean ± std over seeds is computed as stated.

use candle_core::{DType, Device, Tensor, Var};
use scoreguide_data::{GaussianMixture, ImageSet};
use scoreguide_experiments::dlsm_images::{
    likelihood_score_excess, load_guidance_classifier, mean_std, sample_class, summarise,
    train_guidance_classifier, DlsmReduction, GuidanceClassifierConfig, ImageSampler, Method,
    Scores,
};
use scoreguide_experiments::moons::ClassifierLoss;
use scoreguide_guidance::{Cond, LogProb, Score};
use scoreguide_losses::DsmWeighting;
use scoreguide_nets::{Classifier, ResNetConfig, SinusoidalEmbedding};
use scoreguide_sde::SigmaDistribution;
use scoreguide_train::{Checkpoint, Progress};

const D: usize = 16;

fn class_mean(c: usize) -> Vec<f64> {
    (0..D)
        .map(|j| if (j < D / 2) == (c == 0) { 0.15 } else { -0.15 })
        .collect()
}

fn component(c: usize) -> GaussianMixture {
    GaussianMixture::new(vec![1.0], vec![class_mean(c)], vec![vec![0.3; D]]).unwrap()
}

fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.5, 0.5],
        vec![class_mean(0), class_mean(1)],
        vec![vec![0.3; D], vec![0.3; D]],
    )
    .unwrap()
}

/// 256 images of each class, 1 × 4 × 4.
fn data() -> ImageSet {
    let parts: Vec<Tensor> = (0..2)
        .map(|c| component(c).sample(256, 10 + c as u64).unwrap())
        .collect();
    let labels = (0..512).map(|i| (i / 256) as u32).collect();
    ImageSet::new(Tensor::cat(&parts, 0).unwrap(), labels, 1, 4, 2, "mixture").unwrap()
}

fn config() -> GuidanceClassifierConfig {
    GuidanceClassifierConfig {
        resnet: ResNetConfig {
            channels: 1,
            size: 4,
            blocks: vec![1, 1],
            width: 8,
            classes: 2,
            noise_embedding: Some(SinusoidalEmbedding {
                dim: 16,
                max_freq: 100.0,
            }),
            groups: 2,
        },
        batch: 64,
        iters: 300,
        lr: 2e-3,
        warmup_steps: 0,
        grad_clip: Some(1.0),
        ema_decay: 0.0,
        sigma: SigmaDistribution::LogUniform { min: 0.1, max: 3.0 },
        ce_weight: 1.0,
        dlsm_weighting: DsmWeighting::SigmaSquared,
        dlsm_reduction: DlsmReduction::PixelMean,
        flip: false,
        save_every: 0,
    }
}

fn train(loss: ClassifierLoss, iters: u64) -> Classifier {
    let cfg = GuidanceClassifierConfig { iters, ..config() };
    let c: Checkpoint = train_guidance_classifier(
        &cfg,
        loss,
        Some(&mixture()),
        &data(),
        3,
        None,
        &Device::Cpu,
        &mut Progress::hidden(),
    )
    .unwrap();
    load_guidance_classifier(&c, &Device::Cpu).unwrap()
}

/// On noised data at σ: mean ‖∇x log p_φ(y | x) − ∇x log p(y | x)‖ / mean ‖∇x log p(y | x)‖,
/// and per pixel E‖∇x log p_φ − ∇x log p‖² − E‖∇x log p‖² beside E‖∇x log p‖².
fn likelihood_score_error(classifier: &Classifier, sigma: f64) -> (f64, f64, f64) {
    let set = data();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(99);
    let x0 = set.images.tensor();
    let z = scoreguide_sde::randn(&mut rng, x0.dims(), &Device::Cpu).unwrap();
    let x = (x0 + (z * sigma).unwrap()).unwrap();
    let s = Tensor::full(sigma as f32, 512, &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(set.labels.clone(), 512, &Device::Cpu).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let lp = classifier
        .log_prob_with(xv.as_tensor(), &s, &Cond::labels(labels))
        .unwrap();
    let g = lp.sum_all().unwrap().backward().unwrap();
    let g = g.get(xv.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    let prior = mixture().score(&x, &s).unwrap().to_vec2::<f32>().unwrap();
    let comps: Vec<Vec<Vec<f32>>> = (0..2)
        .map(|c| {
            component(c)
                .score(&x, &s)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        })
        .collect();
    let (mut err, mut norm, mut sq_err, mut sq_norm) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..512 {
        let c = set.labels[i] as usize;
        let (mut e, mut n) = (0.0f64, 0.0f64);
        for j in 0..D {
            let truth = (comps[c][i][j] - prior[i][j]) as f64;
            e += (g[i][j] as f64 - truth).powi(2);
            n += truth.powi(2);
        }
        err += e.sqrt();
        norm += n.sqrt();
        sq_err += e;
        sq_norm += n;
    }
    let per_pixel = (512 * D) as f64;
    (
        err / norm,
        (sq_err - sq_norm) / per_pixel,
        sq_norm / per_pixel,
    )
}

#[test]
fn dlsm_learns_the_likelihood_score_and_guides_samples_into_their_class() {
    std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1");
    std::thread::spawn(|| {
        let untrained = train(ClassifierLoss::CrossEntropy, 1);
        let ce = train(ClassifierLoss::CrossEntropy, 600);
        let total = train(ClassifierLoss::Total { ce_weight: 1.0 }, 600);
        let excess = |sigma: f64| {
            let e = likelihood_score_excess(
                &[&ce, &total],
                &mixture(),
                &data(),
                &[sigma],
                5,
                100,
                &Device::Cpu,
            )
            .unwrap();
            (e[0][0], e[1][0])
        };
        for sigma in [0.3, 1.0] {
            let (e0, e_ce, (e_total, exact, scale)) = (
                likelihood_score_error(&untrained, sigma).0,
                likelihood_score_error(&ce, sigma).0,
                likelihood_score_error(&total, sigma),
            );
            // The held-out DLSM excess estimates E‖g − ∇ log p‖² − E‖∇ log p‖² (the prior
            // here is exact) and ranks the classifiers as the exact error does.
            let (x_ce, x_total) = excess(sigma);
            eprintln!("σ = {sigma}: excess CE {x_ce:.4}, DLSM + CE {x_total:.4} (exact {exact:.4} of {scale:.4})");
            assert!(
                (x_total - exact).abs() < 0.2 * scale,
                "σ = {sigma}: estimated excess {x_total} vs exact {exact} (E‖∇ log p‖² {scale})"
            );
            assert!(x_total < x_ce, "σ = {sigma}: excess DLSM {x_total} vs CE {x_ce}");
            eprintln!("σ = {sigma}: untrained {e0:.3}, CE {e_ce:.3}, DLSM + CE {e_total:.3}");
            assert!(
                e_total < 0.5 * e0,
                "σ = {sigma}: {e_total} vs untrained {e0}"
            );
            assert!(e_total < e_ce, "σ = {sigma}: DLSM {e_total} vs CE {e_ce}");
        }
        // Guided by the DLSM classifier, samples of each class land nearer its mean.
        let (sampler, sigmas) = ImageSampler::Heun { steps: 10 }.build(0.01, 5.0).unwrap();
        for class in 0..2u32 {
            let x = sample_class(
                &mixture(),
                &total,
                1.0,
                class,
                64,
                &sampler,
                &sigmas,
                7,
                32,
                &Device::Cpu,
                &mut |_| {},
            )
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
            let right = x
                .iter()
                .filter(|row| {
                    let d = |c: usize| -> f64 {
                        row.iter()
                            .zip(class_mean(c))
                            .map(|(a, b)| (a - b).powi(2))
                            .sum()
                    };
                    d(class as usize) < d(1 - class as usize)
                })
                .count();
            assert!(
                right >= 60,
                "class {class}: {right} of 64 samples in their class"
            );
        }
    })
    .join()
    .unwrap();
}

#[test]
fn summaries_are_means_and_sample_deviations_over_seeds() {
    let row = |seed: u64, fid: f64, cas: f64| Scores {
        seed,
        images: 10,
        features: "test".into(),
        fid,
        kid: 0.0,
        is: fid / 2.0,
        is_split_std: 0.5,
        precision: 0.5,
        recall: 0.5,
        density: 1.0,
        coverage: 0.5,
        cw_precision: 0.5,
        cw_recall: 0.5,
        cw_density: 1.0,
        cw_coverage: 0.5,
        per_class: vec![[0.5; 4]],
        cas,
        fid_domain: 2.0,
        checksum: [0.0, 0.0],
    };
    let s = summarise("dlsm", 1.0, &[row(0, 10.0, 0.6), row(1, 14.0, 0.8)]).unwrap();
    assert_eq!(s["name"], "dlsm");
    approx::assert_relative_eq!(s["fid"].as_f64().unwrap(), 12.0);
    approx::assert_relative_eq!(s["fid_std"].as_f64().unwrap(), 8f64.sqrt());
    approx::assert_relative_eq!(s["cas"].as_f64().unwrap(), 0.7, epsilon = 1e-12);
    // `is_std` is IS's spread over seeds, not the mean of its spread over splits.
    approx::assert_relative_eq!(s["is_std"].as_f64().unwrap(), 2f64.sqrt());
    approx::assert_relative_eq!(s["is_split_std"].as_f64().unwrap(), 0.5);
    assert_eq!(s["seeds"].as_array().unwrap().len(), 2);
    assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    assert_eq!(Method::parse("scaling").unwrap(), Method::Scaling);
    assert!(Method::parse("ours")
        .unwrap_err()
        .to_string()
        .contains("ours"));
}
