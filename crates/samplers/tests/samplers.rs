//! Every sampler against an analytic score: a 2-D Gaussian mixture, whose noised score
//! is known in closed form at every σ. Sample mean and covariance must match the
//! mixture's closed-form moments.

use candle_core::{DType, Device, Tensor};
use scoreguide_data::GaussianMixture;
use scoreguide_guidance::Cond;
use scoreguide_guidance::Score;
use scoreguide_samplers::{
    initial_noise, probability_flow, HeunOptions, OdeSolver, PcOptions, Sampler,
};
use scoreguide_sde::{append_zero, log_linear, Process, SampleNoise};

const N: usize = 4000;

fn mixture() -> GaussianMixture {
    GaussianMixture::new(
        vec![0.4, 0.6],
        vec![vec![-2.0, 0.5], vec![1.5, -1.0]],
        vec![vec![0.5, 0.3], vec![0.4, 0.6]],
    )
    .unwrap()
}

fn moments(x: &Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let v = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let n = v.len() as f64;
    let mean: Vec<f64> = (0..2)
        .map(|j| v.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let cov = (0..2)
        .map(|i| {
            (0..2)
                .map(|j| {
                    v.iter()
                        .map(|r| (r[i] - mean[i]) * (r[j] - mean[j]))
                        .sum::<f64>()
                        / (n - 1.0)
                })
                .collect()
        })
        .collect();
    (mean, cov)
}

/// Tolerances: the standard error of the mean is about sqrt(3/4000) ≈ 0.03 and of a
/// covariance entry about 0.07 here; we allow roughly 3–4 standard errors plus a
/// little discretisation bias.
fn check_moments(name: &str, x: &Tensor) -> Result<(), String> {
    let gm = mixture();
    let (mean, cov) = moments(x);
    let (tm, tc) = (gm.mean(), gm.covariance(0.0));
    for j in 0..2 {
        if (mean[j] - tm[j]).abs() >= 0.12 {
            return Err(format!("{name}: mean[{j}] {} vs {}", mean[j], tm[j]));
        }
    }
    for i in 0..2 {
        for j in 0..2 {
            if (cov[i][j] - tc[i][j]).abs() >= 0.25 {
                return Err(format!(
                    "{name}: cov[{i}][{j}] {} vs {}",
                    cov[i][j], tc[i][j]
                ));
            }
        }
    }
    Ok(())
}

fn assert_matches(name: &str, x: &Tensor) {
    if let Err(e) = check_moments(name, x) {
        panic!("{e}");
    }
}

fn run(sampler: Sampler, sigmas: &[f64], seed: u64) -> Tensor {
    let gm = mixture();
    let mut noise = SampleNoise::new(seed, 0, N);
    let x = initial_noise(&mut noise, &[N, 2], sigmas[0], DType::F32, &Device::Cpu).unwrap();
    sampler.sample(&gm, x, sigmas, &mut noise, None).unwrap()
}

fn grid(n: usize) -> Vec<f64> {
    append_zero(log_linear(n, 0.005, 20.0).unwrap())
}

#[test]
fn heun_with_churn_matches_mixture_moments() {
    let x = run(
        Sampler::Heun(HeunOptions {
            churn: 10.0,
            ..Default::default()
        }),
        &grid(60),
        1,
    );
    assert_matches("heun", &x);
}

#[test]
fn heun_deterministic_matches_mixture_moments() {
    assert_matches(
        "heun (no churn)",
        &run(Sampler::Heun(HeunOptions::default()), &grid(60), 2),
    );
}

#[test]
fn euler_matches_mixture_moments() {
    assert_matches("euler", &run(Sampler::Euler, &grid(200), 3));
}

#[test]
fn euler_maruyama_matches_mixture_moments() {
    assert_matches(
        "euler-maruyama",
        &run(Sampler::EulerMaruyama, &grid(400), 4),
    );
}

#[test]
fn predictor_corrector_matches_mixture_moments() {
    assert_matches(
        "pc",
        &run(
            Sampler::PredictorCorrector(PcOptions::default()),
            &grid(200),
            5,
        ),
    );
}

#[test]
fn ddim_matches_mixture_moments() {
    assert_matches(
        "ddim eta=0",
        &run(Sampler::Ddim { eta: 0.0 }, &grid(100), 6),
    );
    assert_matches(
        "ddim eta=0.5",
        &run(Sampler::Ddim { eta: 0.5 }, &grid(100), 7),
    );
}

#[test]
fn ddpm_ancestral_on_a_ddpm_grid_matches_mixture_moments() {
    // The VP (linear β, 1000 steps) process's own σ levels, every 10th, descending.
    let Process::Ddpm(d) = Process::ddpm_linear(1000).unwrap() else {
        unreachable!()
    };
    let sigmas: Vec<f64> = d.sigmas().iter().rev().step_by(10).cloned().collect();
    assert!(sigmas[0] > 150.0);
    assert_matches(
        "ddpm ancestral",
        &run(Sampler::DdpmAncestral, &append_zero(sigmas), 8),
    );
}

#[test]
fn probability_flow_rk4_matches_mixture_moments() {
    assert_matches(
        "pf-ode rk4",
        &run(
            Sampler::ProbabilityFlow {
                solver: OdeSolver::Rk4,
            },
            &grid(40),
            9,
        ),
    );
}

#[test]
fn samplers_do_not_all_agree_with_a_wrong_target() {
    // Guard against a test that cannot fail: moments of a shifted mixture are rejected.
    let shifted = GaussianMixture::new(
        vec![0.4, 0.6],
        vec![vec![-1.0, 0.5], vec![2.5, -1.0]],
        vec![vec![0.5, 0.3], vec![0.4, 0.6]],
    )
    .unwrap();
    let sigmas = grid(60);
    let mut noise = SampleNoise::new(0, 0, N);
    let x = initial_noise(&mut noise, &[N, 2], sigmas[0], DType::F32, &Device::Cpu).unwrap();
    let x = Sampler::Heun(HeunOptions::default())
        .sample(&shifted, x, &sigmas, &mut noise, None)
        .unwrap();
    assert!(
        check_moments("shifted", &x).is_err(),
        "moments of a shifted mixture passed the check"
    );
}

#[test]
fn probability_flow_maps_data_to_noise_and_back() {
    let gm = mixture();
    let data = gm.sample(500, 11).unwrap().to_dtype(DType::F64).unwrap();
    let up = log_linear(300, 1e-3, 40.0)
        .unwrap()
        .into_iter()
        .rev()
        .collect::<Vec<_>>();
    let down = log_linear(300, 1e-3, 40.0).unwrap();
    let z = probability_flow(&gm, data.clone(), &up, &Cond::none(), OdeSolver::Rk4, None).unwrap();
    // At σ = 40 the marginal is essentially N(mean, 40² I): data became noise.
    let (_, cov) = moments(&z);
    let data_cov = gm.covariance(0.0);
    for (i, row) in cov.iter().enumerate() {
        let target = 1600.0 + data_cov[i][i];
        assert!(
            (row[i] / target - 1.0).abs() < 0.15,
            "encoded variance {} vs {target}",
            row[i]
        );
    }
    let back = probability_flow(&gm, z, &down, &Cond::none(), OdeSolver::Rk4, None).unwrap();
    let err = scoreguide_testing::max_abs_diff(&back, &data);
    assert!(err < 1e-3, "round-trip error {err}");
}

#[test]
fn gaussian_score_is_exact_at_every_sigma() {
    // Sanity of the analytic reference against the single-Gaussian closed form.
    let g = GaussianMixture::new(vec![1.0], vec![vec![1.0, -2.0]], vec![vec![0.5, 2.0]]).unwrap();
    let x = Tensor::new(&[[0.0f64, 0.0], [3.0, 1.0]], &Device::Cpu).unwrap();
    for s in [0.01, 1.0, 30.0] {
        let sig = Tensor::new(&[s, s], &Device::Cpu).unwrap();
        let got = g.score(&x, &sig).unwrap().to_vec2::<f64>().unwrap();
        let want = [
            [(1.0 - 0.0) / (0.25 + s * s), (-2.0 - 0.0) / (4.0 + s * s)],
            [(1.0 - 3.0) / (0.25 + s * s), (-2.0 - 1.0) / (4.0 + s * s)],
        ];
        for i in 0..2 {
            for j in 0..2 {
                approx::assert_relative_eq!(got[i][j], want[i][j], max_relative = 1e-12);
            }
        }
    }
}
