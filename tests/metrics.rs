//! Likelihood against a Gaussian whose density is known, MMD² against the reference
//! values computed by Python (../shared/reference/metrics/expected.json).

use candle_core::{DType, Device, Tensor};
use scoreguide::data::GaussianMixture;
use scoreguide::metrics::{
    mmd2_gaussian, negative_log_likelihood, read_npy, Divergence, NllConfig,
};

fn reference_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/reference/metrics")
}

#[test]
fn likelihood_of_a_gaussian_matches_its_density() {
    // Data N(0, diag(v)); the model is its exact score, so the ODE likelihood must equal
    // log N(x; 0, v + σ_min²) up to the prior mismatch at σ_max: the prior is N(0, σ_max² I)
    // while p_{σ_max} = N(0, v + σ_max²), a difference of about v/σ_max² (1e-5 nats).
    // (With a non-zero mean μ the mismatch adds x_T·μ/σ_max² per point — ±0.01 nats at
    // σ_max = 300, zero on average — which is the estimator's definition, not an error.)
    let gm = GaussianMixture::new(vec![1.0], vec![vec![0.0, 0.0]], vec![vec![0.7, 1.3]]).unwrap();
    let x = gm.sample(64, 3).unwrap().to_dtype(DType::F64).unwrap();
    let cfg = NllConfig {
        sigma_min: 1e-3,
        sigma_max: 300.0,
        steps: 60,
        ..NllConfig::default()
    };
    let rows = x.to_vec2::<f64>().unwrap();
    let exact: Vec<f64> = rows
        .iter()
        .map(|r| -gm.log_density(r, cfg.sigma_min))
        .collect();
    for divergence in [Divergence::Exact, Divergence::Hutchinson { seed: 1 }] {
        let got = negative_log_likelihood(&gm, &x, &NllConfig { divergence, ..cfg }).unwrap();
        let tol = if divergence == Divergence::Exact {
            2e-3
        } else {
            0.05
        };
        let mean_err = got.iter().zip(&exact).map(|(a, b)| a - b).sum::<f64>() / got.len() as f64;
        assert!(
            mean_err.abs() < tol,
            "{divergence:?}: mean NLL error {mean_err}"
        );
        if divergence == Divergence::Exact {
            for (a, b) in got.iter().zip(&exact) {
                assert!((a - b).abs() < 2e-3, "NLL {a} vs exact {b}");
            }
        }
    }
    assert!(negative_log_likelihood(
        &gm,
        &Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
        &cfg
    )
    .is_err());
}

#[test]
fn mmd_matches_the_reference_values() {
    let dir = reference_dir();
    let real = read_npy(&std::fs::read(dir.join("dev_real.npy")).unwrap()).unwrap();
    let fake = read_npy(&std::fs::read(dir.join("dev_fake.npy")).unwrap()).unwrap();
    assert_eq!(
        (real.rows, real.cols, fake.rows, fake.cols),
        (300, 32, 300, 32)
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (sigma, key) in [(4.0, "mmd2_rbf_sigma4"), (8.0, "mmd2_rbf_sigma8")] {
        let got = mmd2_gaussian(&real.data, &fake.data, 32, sigma).unwrap();
        let want = expected[key].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-9 * want.abs().max(1e-12),
            "{key}: {got} vs {want}"
        );
    }
    // Identical sets: the unbiased estimate is slightly negative or zero, never large.
    let same = mmd2_gaussian(&real.data, &real.data, 32, 4.0).unwrap();
    assert!(same.abs() < 0.05, "{same}");
    assert!(mmd2_gaussian(&real.data[..32], &fake.data, 32, 4.0).is_err());
}

#[test]
fn npy_reader_rejects_bad_files() {
    assert!(read_npy(b"not numpy").is_err());
    let dir = reference_dir();
    let bytes = std::fs::read(dir.join("dev_real.npy")).unwrap();
    assert!(read_npy(&bytes[..bytes.len() - 3])
        .unwrap_err()
        .to_string()
        .contains("bytes"));
}
