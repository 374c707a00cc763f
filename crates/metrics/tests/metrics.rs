//! Likelihood against a Gaussian whose density is known, MMD² against the reference
//! values computed by Python (../shared/reference/metrics/expected.json).

use candle_core::{DType, Device, Tensor};
use scoreguide_data::GaussianMixture;
use scoreguide_metrics::{
    fid, frechet_distance, kid, mmd2_gaussian, negative_log_likelihood, prdc, prdc_classwise,
    read_npy, score_errors, symmetric_eigen, Array2, Divergence, NllConfig,
};

fn reference() -> (Array2, Array2, serde_json::Value) {
    let dir = reference_dir();
    let real = read_npy(&std::fs::read(dir.join("dev_real.npy")).unwrap()).unwrap();
    let fake = read_npy(&std::fs::read(dir.join("dev_fake.npy")).unwrap()).unwrap();
    let expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (real, fake, expected)
}

fn assert_rel(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1e-12),
        "{what}: {got} vs {want}"
    );
}

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
    let (real, fake, expected) = reference();
    assert_eq!(
        (real.rows, real.cols, fake.rows, fake.cols),
        (300, 32, 300, 32)
    );
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

#[test]
fn fid_kid_and_prdc_match_the_reference_values() {
    let (real, fake, expected) = reference();
    let d = real.cols;
    assert_rel(
        fid(&real.data, &fake.data, d).unwrap(),
        expected["fid"].as_f64().unwrap(),
        1e-9,
        "FID",
    );
    assert_rel(
        kid(&real.data, &fake.data, d).unwrap(),
        expected["kid"].as_f64().unwrap(),
        1e-9,
        "KID",
    );
    for k in [3, 5] {
        let p = prdc(&real.data, &fake.data, d, k).unwrap();
        let e = &expected[format!("prdc_k{k}")];
        for (got, key) in [
            (p.precision, "precision"),
            (p.recall, "recall"),
            (p.density, "density"),
            (p.coverage, "coverage"),
        ] {
            assert_rel(got, e[key].as_f64().unwrap(), 1e-9, &format!("k={k} {key}"));
        }
    }
}

#[test]
fn set_metrics_on_identical_sets() {
    let (real, _, _) = reference();
    let d = real.cols;
    assert!(fid(&real.data, &real.data, d).unwrap().abs() < 1e-8);
    let p = prdc(&real.data, &real.data, d, 3).unwrap();
    // Every point sits at distance 0 from its copy, inside its own ball.
    assert_eq!((p.precision, p.recall, p.coverage), (1.0, 1.0, 1.0));
    assert!(p.density >= 1.0 / 3.0);
    // Class-wise: two halves labelled apart give each class the identical-set answer.
    let labels: Vec<u32> = (0..real.rows)
        .map(|i| u32::from(i >= real.rows / 2))
        .collect();
    let (avg, per) = prdc_classwise(&real.data, &labels, &real.data, &labels, d, 3).unwrap();
    assert_eq!(per.len(), 2);
    assert_eq!((avg.precision, avg.recall, avg.coverage), (1.0, 1.0, 1.0));
}

#[test]
fn fid_of_gaussians_matches_the_closed_form() {
    // Diagonal covariances commute, so Tr(Σ1 Σ2)^{1/2} = Σ sqrt(a_i b_i).
    let mu1 = [0.0, 1.0, -2.0];
    let mu2 = [0.5, 1.0, 0.0];
    let a: [f64; 3] = [1.0, 2.0, 0.5];
    let b: [f64; 3] = [3.0, 0.25, 0.5];
    let diag = |v: &[f64; 3]| {
        let mut m = vec![0.0; 9];
        for i in 0..3 {
            m[i * 3 + i] = v[i];
        }
        m
    };
    let want: f64 = 0.25
        + 4.0
        + (0..3)
            .map(|i| a[i] + b[i] - 2.0 * (a[i] * b[i]).sqrt())
            .sum::<f64>();
    let got = frechet_distance(&mu1, &diag(&a), &mu2, &diag(&b)).unwrap();
    assert_rel(got, want, 1e-12, "diagonal");
    // Rotating both covariances by the same orthogonal matrix leaves the distance alone.
    let (c, s) = (0.6f64, 0.8f64);
    let r = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
    let rot = |m: &[f64]| {
        let mut t = vec![0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                t[i * 3 + j] = (0..3)
                    .flat_map(|k| (0..3).map(move |l| (k, l)))
                    .map(|(k, l)| r[i * 3 + k] * m[k * 3 + l] * r[j * 3 + l])
                    .sum();
            }
        }
        t
    };
    let got_rot = frechet_distance(&mu1, &rot(&diag(&a)), &mu2, &rot(&diag(&b))).unwrap();
    assert_rel(got_rot, want, 1e-10, "rotated");
    // The eigendecomposition reconstructs its input.
    let m = rot(&diag(&a));
    let (l, v) = symmetric_eigen(&m, 3).unwrap();
    for i in 0..3 {
        for j in 0..3 {
            let back: f64 = (0..3).map(|k| v[i * 3 + k] * l[k] * v[j * 3 + k]).sum();
            assert!((back - m[i * 3 + j]).abs() < 1e-12);
        }
    }
}

#[test]
fn set_metrics_reject_bad_input() {
    let (real, fake, _) = reference();
    let mut nan = fake.data.clone();
    nan[40] = f64::NAN;
    let err = fid(&real.data, &nan, 32).unwrap_err().to_string();
    assert!(err.contains("row 1"), "{err}");
    assert!(prdc(&real.data[..3 * 32], &fake.data, 32, 3)
        .unwrap_err()
        .to_string()
        .contains("at least 4 rows"));
    assert!(kid(&real.data, &fake.data[..31], 32).is_err());
    assert!(score_errors(&[0.0; 4], &[0.0; 2], &[0.0; 4], &[0.0; 4], 2).is_err());
}

/// IS by hand for two rows of two classes: p(y) = (0.6, 0.4); KLs of (0.9, 0.1) and
/// (0.3, 0.7) against it, averaged, exponentiated.
#[test]
fn inception_score_by_hand_and_its_bounds() {
    use scoreguide_metrics::inception_score;
    let p = [0.9, 0.1, 0.3, 0.7];
    let kl = |a: f64, b: f64| a * (a / 0.6f64).ln() + b * (b / 0.4f64).ln();
    let want = ((kl(0.9, 0.1) + kl(0.3, 0.7)) / 2.0).exp();
    let (is, std) = inception_score(&p, 2, 1).unwrap();
    approx::assert_relative_eq!(is, want, max_relative = 1e-12);
    assert_eq!(std, 0.0);
    // Identical rows: 1. Bad input: named errors.
    assert!((inception_score(&[0.5, 0.5, 0.5, 0.5], 2, 2).unwrap().0 - 1.0).abs() < 1e-12);
    assert!(inception_score(&p, 2, 3).is_err());
    assert!(inception_score(&[0.5, f64::NAN], 2, 1).is_err());
    assert!(inception_score(&[1.5, -0.5], 2, 1).is_err());
}

proptest::proptest! {
    /// Between 1 and the number of classes, and blind to the classes' order.
    #[test]
    fn inception_score_is_bounded_and_label_free(
        raw in proptest::collection::vec(0.01f64..1.0, 40),
        splits in 1usize..4,
    ) {
        use scoreguide_metrics::inception_score;
        let probs: Vec<f64> = raw
            .chunks(4)
            .flat_map(|r| { let s: f64 = r.iter().sum(); r.iter().map(move |v| v / s) })
            .collect();
        let (is, _) = inception_score(&probs, 4, splits).unwrap();
        proptest::prop_assert!((1.0 - 1e-9..=4.0 + 1e-9).contains(&is));
        let swapped: Vec<f64> = probs.chunks(4).flat_map(|r| [r[2], r[0], r[3], r[1]]).collect();
        let (again, _) = inception_score(&swapped, 4, splits).unwrap();
        proptest::prop_assert!((is - again).abs() < 1e-9);
    }
}

proptest::proptest! {
    /// The eigendecomposition rebuilds the matrix with orthonormal vectors, and the
    /// values-only path agrees; FID through the few-rows identity equals FID through
    /// the covariances.
    #[test]
    fn eigendecomposition_rebuilds_symmetric_matrices(
        raw in proptest::collection::vec(-3.0f64..3.0, 144),
        d in 1usize..12,
    ) {
        use scoreguide_metrics::symmetric_eigenvalues;
        let mut a = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..=i {
                a[i * d + j] = raw[i * 12 + j];
                a[j * d + i] = raw[i * 12 + j];
            }
        }
        let (l, v) = symmetric_eigen(&a, d).unwrap();
        for i in 0..d {
            for j in 0..d {
                let rebuilt: f64 = (0..d).map(|k| v[i * d + k] * l[k] * v[j * d + k]).sum();
                proptest::prop_assert!((rebuilt - a[i * d + j]).abs() < 1e-9);
                let gram: f64 = (0..d).map(|k| v[k * d + i] * v[k * d + j]).sum();
                proptest::prop_assert!((gram - f64::from(u8::from(i == j))).abs() < 1e-9);
            }
        }
        let only = symmetric_eigenvalues(&a, d).unwrap();
        for (p, q) in l.iter().zip(&only) {
            proptest::prop_assert!((p - q).abs() < 1e-9);
        }
        proptest::prop_assert!(l.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn fid_with_fewer_rows_than_features_matches_the_covariance_formula(
        raw in proptest::collection::vec(-2.0f64..2.0, 2 * 7 * 9),
        n1 in 2usize..7,
        n2 in 2usize..7,
    ) {
        let d = 9;
        let (x, y) = (&raw[..n1 * d], &raw[7 * d..7 * d + n2 * d]);
        let (m1, c1) = scoreguide_metrics::mean_and_covariance(x, d).unwrap();
        let (m2, c2) = scoreguide_metrics::mean_and_covariance(y, d).unwrap();
        let want = frechet_distance(&m1, &c1, &m2, &c2).unwrap();
        let got = fid(x, y, d).unwrap();
        // The covariance path takes square roots of the rank-deficient Σ₁Σ₂'s round-off
        // eigenvalues (√1e-16 = 1e-8 each); the few-rows path has none.
        proptest::prop_assert!((got - want).abs() < 1e-6 * (1.0 + want.abs()), "{got} vs {want}");
    }
}
