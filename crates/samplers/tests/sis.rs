//! Sequential importance sampling against analytic mixtures: chains drawn with one
//! mixture's transitions and weighted for another's must give the other's moments and
//! class masses, and with the same model on both sides they are the plain sampler's.

use candle_core::{DType, Device, Tensor};
use scoreguide_data::GaussianMixture;
use scoreguide_guidance::Cond;
use scoreguide_samplers::{initial_noise, sample_sis, HeunOptions, Sampler};
use scoreguide_sde::{append_zero, log_linear, SampleNoise};

fn proposal() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.5, 0.5],
        vec![vec![-2.0, 0.0], vec![2.0, 0.0]],
        vec![vec![0.5, 0.5], vec![0.5, 0.5]],
    )
    .unwrap()
}

/// The same components, the right one now rare: what a guided model does to an
/// invalid region.
fn target() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.9, 0.1],
        vec![vec![-2.0, 0.0], vec![2.0, 0.0]],
        vec![vec![0.5, 0.5], vec![0.5, 0.5]],
    )
    .unwrap()
}

fn start(n: usize, sigmas: &[f64], seed: u64) -> (Tensor, SampleNoise) {
    let mut noise = SampleNoise::new(seed, 0, n);
    let x = initial_noise(&mut noise, &[n, 2], sigmas[0], DType::F32, &Device::Cpu).unwrap();
    (x, noise)
}

#[test]
fn same_model_on_both_sides_is_the_plain_sampler_to_the_bit() {
    let sigmas = append_zero(log_linear(30, 0.01, 20.0).unwrap());
    let gm = proposal();
    for sampler in [
        Sampler::DdpmAncestral,
        Sampler::EulerMaruyama,
        Sampler::Ddim { eta: 0.5 },
    ] {
        let (x, mut noise) = start(64, &sigmas, 3);
        let plain = sampler
            .sample_with(&gm, x.clone(), &sigmas, &Cond::none(), &mut noise, None)
            .unwrap();
        let (_, mut noise) = start(64, &sigmas, 3);
        let (sis, log_w) = sample_sis(
            &sampler,
            &gm,
            &gm,
            x,
            &sigmas,
            &Cond::none(),
            &mut noise,
            None,
        )
        .unwrap();
        let a = plain.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = sis.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{sampler:?}"
        );
        assert!(log_w.iter().all(|&w| w == 0.0), "{sampler:?}");
    }
}

/// Weighted draws from the proposal give the target's share of the right-hand
/// component (0.1 against the proposal's 0.5) and its mean; an unweighted count would
/// give 0.5.
#[test]
fn weighted_chains_stand_for_the_target() {
    let sigmas = append_zero(log_linear(60, 0.01, 20.0).unwrap());
    let n = 8000;
    for sampler in [Sampler::DdpmAncestral, Sampler::EulerMaruyama] {
        let (x, mut noise) = start(n, &sigmas, 11);
        let (out, log_w) = sample_sis(
            &sampler,
            &target(),
            &proposal(),
            x,
            &sigmas,
            &Cond::none(),
            &mut noise,
            None,
        )
        .unwrap();
        let top = log_w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = log_w.iter().map(|l| (l - top).exp()).collect();
        let total: f64 = w.iter().sum();
        let ess = total * total / w.iter().map(|v| v * v).sum::<f64>();
        let rows = out.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        let right: f64 = rows
            .iter()
            .zip(&w)
            .filter(|(r, _)| r[0] > 0.0)
            .map(|(_, w)| w)
            .sum::<f64>()
            / total;
        let unweighted = rows.iter().filter(|r| r[0] > 0.0).count() as f64 / n as f64;
        let mean_x: f64 = rows.iter().zip(&w).map(|(r, w)| r[0] * w).sum::<f64>() / total;
        // The target's mean of the first coordinate: 0.9·(−2) + 0.1·2 = −1.6.
        assert!(
            (right - 0.1).abs() < 0.03,
            "{sampler:?}: weighted right-hand share {right} (ESS {ess:.0})"
        );
        assert!((unweighted - 0.5).abs() < 0.05, "{sampler:?}: {unweighted}");
        assert!((mean_x + 1.6).abs() < 0.15, "{sampler:?}: mean {mean_x}");
        assert!(ess > 0.2 * n as f64, "{sampler:?}: ESS {ess:.0} of {n}");
    }
}

#[test]
fn deterministic_samplers_and_bad_masks_are_refused() {
    let sigmas = append_zero(log_linear(5, 0.01, 20.0).unwrap());
    let gm = proposal();
    for sampler in [
        Sampler::Heun(HeunOptions::default()),
        Sampler::Euler,
        Sampler::Ddim { eta: 0.0 },
    ] {
        let (x, mut noise) = start(4, &sigmas, 0);
        let e = sample_sis(
            &sampler,
            &gm,
            &gm,
            x,
            &sigmas,
            &Cond::none(),
            &mut noise,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("Gaussian"), "{e}");
    }
    let (x, mut noise) = start(4, &sigmas, 0);
    let mask = Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap();
    let cond = Cond::none().with_mask(mask);
    let e = sample_sis(
        &Sampler::DdpmAncestral,
        &gm,
        &gm,
        x,
        &sigmas,
        &cond,
        &mut noise,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("mask"), "{e}");
}
